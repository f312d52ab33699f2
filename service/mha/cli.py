"""The `mha` command: one entry point, subcommands imported lazily.

`mha serve` must never import torch, so each subcommand's module is imported only when
that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mha.errors import CliError

__all__ = ["SUBCOMMANDS", "CliError", "build_parser", "main"]

# subcommand -> (module, help). Each module defines add_arguments(parser, argv) (argv = the
# arguments after the subcommand's name, for subcommands with subcommands of their own) and
# run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("mha.export.cli", "export a model to ONNX with one fused attention node"),
    "serve": ("mha.service.cli", "serve a model repository over the Open Inference Protocol"),
    "infer": ("mha.client.cli", "send an inference request to an OIP gRPC server"),
    "decode": ("mha.client.decode", "decode sequences step by step against a sequence model"),
    "bench": ("mha.bench.cli", "benchmarks: `mha bench export`, `serve`, `decode`"),
}


def build_parser(command: str | None, argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Build the top-level parser; only `command`'s module is imported to fill in its flags."""
    parser = argparse.ArgumentParser(prog="mha", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            rest = list(argv[list(argv).index(name) + 1 :]) if name in argv else []
            importlib.import_module(module_name).add_arguments(sub_parser, rest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `mha` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None, argv)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except CliError as err:
        print(f"mha {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the imported module: under `python -m mha.cli` this file is __main__,
    # and subcommands raise mha.cli.CliError, a different class from __main__.CliError.
    from mha.cli import main as _main

    raise SystemExit(_main())
