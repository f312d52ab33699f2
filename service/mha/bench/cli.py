"""`mha bench export|serve|decode`: dispatch to the benchmark that owns each target.

`export` lives with the export tools (imports torch when it runs); `serve` is a load
generator for any Open Inference Protocol server and never imports torch. Each module
defines add_arguments(parser) and run(args) -> int; only the chosen one is imported.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

BENCHES: dict[str, tuple[str, str]] = {
    "export": ("mha.export.bench", "eager torch vs ONNX Runtime per export target"),
    "serve": (
        "mha.bench.scenarios.serve",
        "load generator for an OIP gRPC server (and this server)",
    ),
    "decode": ("mha.bench.scenarios.decode", "decoding with the server's KV cache vs recomputing"),
    "memory": (
        "mha.bench.scenarios.memory",
        "a server-held cross-attention memory vs resending it",
    ),
    "flood": (
        "mha.bench.scenarios.flood",
        "the server under bursts on one channel and random garbage",
    ),
    "soak": ("mha.bench.scenarios.soak", "minutes of mixed load: memory growth and latency drift"),
}


def add_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    """One sub-parser per benchmark; the flags of the one named in argv only."""
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in BENCHES.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub_parser)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHES[args.bench][0]).run(args) or 0)
