"""`mha bench export|serve`: dispatch to the benchmark that owns each target.

`export` lives with the export tools (imports torch); `serve` is a load generator for any
Open Inference Protocol server and never imports torch. Each module defines
add_arguments(parser) and run(args) -> int, as the top-level subcommands do.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "export": ("mha.export.bench", "eager torch vs ONNX Runtime per export target"),
    "serve": ("mha.service.bench", "load generator for an OIP gRPC server (and this server)"),
}


def _which(argv: list[str]) -> str | None:
    after = argv[argv.index("bench") + 1 :] if "bench" in argv else []
    return next((a for a in after if not a.startswith("-")), None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    chosen = _which(sys.argv)
    for name, (module_name, help_text) in BENCHES.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen or chosen is None:
            importlib.import_module(module_name).add_arguments(sub_parser)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHES[args.bench][0]).run(args) or 0)
