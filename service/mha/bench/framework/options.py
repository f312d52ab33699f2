"""The flags every benchmark shares, and how their values are checked.

Servers: [--repository,] --threads, --server-arg (repeatable); an existing server: --url,
--server-pid (its VmRSS), --metrics-url; output: --out (bench.json, bench.png or bench.md)
and --no-plot; comma-separated lists of whole numbers and of names; BxL shapes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from mha.errors import CliError

MODELS_HELP = "where the two models are (exported if missing; default OUT/models)"
T = TypeVar("T")


def whole_numbers(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated whole numbers >= 1."""
    try:
        numbers = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"want comma-separated whole numbers >= 1, got {text!r}")
    return numbers


def shape(text: str) -> tuple[int, int]:
    """argparse type: BxL, e.g. 8x128."""
    try:
        batch, length = (int(n) for n in text.lower().split("x"))
    except ValueError:
        batch = length = 0
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"want BxL with B, L >= 1, e.g. 8x128; got {text!r}")
    return batch, length


def chosen(text: str | None, choices: Sequence[str], flag: str) -> tuple[str, ...]:
    """A comma-separated subset of `choices` (all of them when not given); CliError else."""
    if not text:
        return tuple(choices)
    wanted = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in wanted if c not in choices]
    if unknown or not wanted:
        raise CliError(f"unknown {flag} {text!r}; choose from {', '.join(choices)}")
    return wanted


def laid_over(preset: T, args: argparse.Namespace, at_least_one: Sequence[str]) -> T:
    """The preset (a dataclass) with every field given as a flag laid over it; CliError
    when one of `at_least_one` is below 1."""
    given = {k: v for k, v in vars(args).items() if k in preset.__dataclass_fields__}  # type: ignore[attr-defined]
    sizes = replace(preset, **{k: v for k, v in given.items() if v is not None})  # type: ignore[type-var]
    if min(getattr(sizes, name) for name in at_least_one) < 1:
        flags = ", ".join("--" + n.replace("_", "-") for n in at_least_one)
        raise CliError(f"{flags} must be >= 1")
    return sizes


def add_server_arguments(
    parser: argparse.ArgumentParser, repository_help: str | None = None
) -> argparse._ArgumentGroup:
    """The "server" group: [--repository,] --threads, --server-arg (repeatable)."""
    server = parser.add_argument_group("server")
    if repository_help is not None:
        server.add_argument("--repository", type=Path, help=repository_help)
    server.add_argument("--threads", type=int, help="intra-op threads (server and in-process)")
    server.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `mha serve` argument, repeatable: --server-arg=--workers=2",
    )
    return server


def add_existing_server_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--url, --server-pid, --metrics-url, and the "server" group for a server started here."""
    given = parser.add_argument_group("an existing server (default: start `mha serve` here)")
    given.add_argument("--url", help="host:port of an Open Inference Protocol gRPC server")
    given.add_argument("--server-pid", type=int, help="its process id, for its VmRSS")
    given.add_argument("--metrics-url", help="its Prometheus endpoint, http://host:port/metrics")
    return add_server_arguments(
        parser, "model repository (default OUT/models; the default model exported if missing)"
    )


def add_output_arguments(
    parser: argparse.ArgumentParser, default_out: Path, plot: bool = True
) -> None:
    """The "output" group: --out (bench.json with bench.png or bench.md) [and --no-plot]."""
    output = parser.add_argument_group("output")
    files = "bench.json and bench.png" if plot else "bench.json and bench.md"
    output.add_argument(
        "--out", type=Path, default=default_out, help=f"folder for {files} (default: %(default)s)"
    )
    if plot:
        output.add_argument("--no-plot", action="store_true", help="skip the PNG")


def sizes_record(sizes: Any) -> dict[str, Any]:
    return {k: getattr(sizes, k) for k in sizes.__dataclass_fields__}


Flag = tuple[str, dict[str, Any]]  # a flag and its argparse keywords


def add_flags(group: argparse._ActionsContainer, flags: Sequence[Flag]) -> None:
    """A scenario's flags, declared as data."""
    for name, keywords in flags:
        group.add_argument(name, **keywords)


SIZE_FLAGS: tuple[Flag, ...] = (
    ("--repeats", dict(type=int, help="runs of each workload, pooled (default 3)")),
    ("--num-heads", dict(type=int, help="attention heads (default 8)")),
    ("--seed", dict(type=int, default=0, help="random tensors' seed (default 0)")),
)  # fmt: skip


def add_sized_arguments(parser: argparse.ArgumentParser, flags: Sequence[Flag], out: Path) -> None:
    """A scenario over a pair of models of a given size: its flags, --repeats, --num-heads,
    --seed, the server group (--repository: where the pair is) and the output group."""
    add_flags(parser.add_argument_group("what to measure"), (*flags, *SIZE_FLAGS))
    add_server_arguments(parser, MODELS_HELP)
    add_output_arguments(parser, out)
