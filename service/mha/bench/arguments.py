"""What every `mha bench` benchmark shares: server and output flags, list flags, the machine.

serve, decode and memory all start `mha serve` processes (--threads, --server-arg), write
bench.json and bench.png to --out, and record the load average around their run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

MODELS_HELP = "where the two models are (exported if missing; default OUT/models)"


def whole_numbers(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated whole numbers >= 1."""
    try:
        numbers = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"want comma-separated whole numbers >= 1, got {text!r}")
    return numbers


def add_server_arguments(
    parser: argparse.ArgumentParser, repository_help: str | None = None
) -> argparse._ArgumentGroup:
    """The "server" group: [--repository,] --threads, --server-arg (repeatable)."""
    server = parser.add_argument_group("server")
    if repository_help is not None:
        server.add_argument("--repository", type=Path, help=repository_help)
    server.add_argument("--threads", type=int, help="intra-op threads (server and in-process)")
    server.add_argument(
        "--server-arg", action="append", default=[], metavar="ARG",
        help="extra `mha serve` argument, repeatable: --server-arg=--workers=2",
    )  # fmt: skip
    return server


def add_output_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """The "output" group: --out (bench.json, bench.png) and --no-plot."""
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=default_out,
        help="folder for bench.json and bench.png (default: %(default)s)",
    )  # fmt: skip
    output.add_argument("--no-plot", action="store_true", help="skip the PNG")


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The JSON record of the machine: cores, load average before and now."""
    return {
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "shared machine: other processes may compete for the cores",
    }
