"""`mha bench export`: torch nn.MultiheadAttention vs our eager module vs ONNX Runtime per target.

The `mha bench` dispatcher imports this module to read its flags, so torch, onnxruntime and
the export machinery are imported inside the functions that use them, never at module level.
Contestants live in bench_contestants, their timing in bench_timing, figures in bench_plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mha.errors import CliError
from mha.export.bench_contestants import PADDED_FRACTION, Case, ort_contestants, torch_contestants
from mha.export.bench_plot import add_speedups, check_targets, plot, results_table, target_lines
from mha.export.bench_timing import BLOCK, cores, time_cases
from mha.export.cli import require_export_extra

Shape = tuple[int, int]
SHAPES: tuple[Shape, ...] = ((1, 16), (1, 128), (8, 128), (1, 1024))
QUICK_SHAPES: tuple[Shape, ...] = ((1, 8), (2, 16))
EXPORT_TARGETS = ("ort", "onnx", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `mha bench export`."""
    parser.add_argument("--out", type=Path, default=Path("bench-out/export"), help="output dir")
    parser.add_argument("--repeats", type=int, help="timed runs per contestant (default 40)")
    parser.add_argument("--warmup", type=int, help="untimed runs per contestant (default 5)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few runs (smoke)")
    parser.add_argument("--shapes", nargs="+", metavar="BxL", help="e.g. 1x16 8x128")
    parser.add_argument("--threads", type=int, help="torch and ORT intra-op threads (cores)")
    parser.add_argument(
        "--repository", type=Path, help="keep/reuse the exports here (default: a temp folder)"
    )
    parser.add_argument("--d-model", type=int, default=512, help="512: the embedded default")
    parser.add_argument("--num-heads", type=int, default=8)


def export_all(module, repository: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """Export every target with the module's weights, reusing matching earlier exports."""
    from mha.export import ExportOptions, export_model
    from mha.export.repository import CONFIG_FILE, MODEL_FILE, has_model
    from mha.model import state_sha256

    digest, cfg = state_sha256(module), module.config
    models = {}
    for target in EXPORT_TARGETS:
        options = ExportOptions(
            repository=repository,
            name=f"bench-{target}-d{cfg.d_model}-h{cfg.num_heads}",
            target=target,
            d_model=cfg.d_model,
            num_heads=cfg.num_heads,
        )
        folder = options.model_dir
        if has_model(folder):
            written = json.loads((folder / CONFIG_FILE).read_text())
            if written.get("weights_sha256") == digest and written.get("target") == target:
                say(f"reusing {folder}")
                models[target] = folder / MODEL_FILE
                continue
        say(f"exporting target {target} into {folder} ...")
        export_model(options, module=module, progress=lambda _: None)
        models[target] = folder / MODEL_FILE
    return models


def machine(threads: int) -> dict:
    """What the figures were measured on."""
    import onnxruntime
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": cores(),
        "threads": threads,
        "loadavg": list(os.getloadavg()),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def parse_shapes(values: list[str] | None, quick: bool) -> list[Shape]:
    """'8x128' -> (8, 128); the targets' shapes (or the quick ones) by default."""
    if not values:
        return list(QUICK_SHAPES if quick else SHAPES)
    shapes = []
    for value in values:
        try:
            batch, length = (int(part) for part in value.lower().split("x"))
        except ValueError:
            raise CliError(f"--shapes {value!r}: expected BxL, e.g. 8x128") from None
        if batch < 1 or length < 4:
            raise CliError(f"--shapes {value!r}: need B >= 1 and L >= 4 (a quarter is padded)")
        shapes.append((batch, length))
    return shapes


@contextlib.contextmanager
def repository_dir(given: Path | None) -> Iterator[Path]:
    """The given repository, or a temporary one removed afterwards."""
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="mha-bench-") as tmp:
        yield Path(tmp)


def settings(args: argparse.Namespace, threads: int, repeats: int, warmup: int) -> dict:
    """How the figures were taken: model, inputs, runs, and both engines' settings."""
    embedded = args.d_model == 512 and args.num_heads == 8
    return {
        "d_model": args.d_model,
        "num_heads": args.num_heads,
        "dtype": "fp32",
        "weights": "seeded:0" + (" (the embedded default)" if embedded else ""),
        "self_attention": True,
        "padded_fraction": PADDED_FRACTION,
        "repeats": repeats,
        "warmup": warmup,
        "block": BLOCK,
        "ort_session": {
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1,
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "providers": ["CPUExecutionProvider"],
            # the graph input is required; the server feeds the same when a request has none
            "unpadded_mask": "all-False key_padding_mask",
        },
        "torch": {"num_threads": threads, "mode": "eval + inference_mode", "need_weights": False},
    }


def run_counts(args: argparse.Namespace) -> tuple[int, int, int]:
    """Timed runs, untimed runs and threads, defaults filled in; CliError when out of range."""
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    threads = args.threads if args.threads is not None else cores()
    if repeats < 1 or warmup < 0 or threads < 1:
        raise CliError(
            f"need --repeats >= 1, --warmup >= 0, --threads >= 1 (got "
            f"{repeats}, {warmup}, {threads})"
        )
    return repeats, warmup, threads


def measure(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Export, build the contestants, time every case; the JSON report (without plot)."""
    from mha.model import DEFAULT_SEED, AttentionConfig, seeded_model

    shapes = parse_shapes(args.shapes, args.quick)
    repeats, warmup, threads = run_counts(args)
    try:
        module = seeded_model(AttentionConfig(args.d_model, args.num_heads), DEFAULT_SEED)
    except ValueError as err:
        raise CliError(str(err)) from err
    cases = [Case(b, length, padded) for b, length in shapes for padded in (False, True)]
    report: dict[str, Any] = {"machine_before": machine(threads)}
    with repository_dir(args.repository) as repo:
        models = export_all(module, repo, say)
        contestants = torch_contestants(module) + ort_contestants(models, threads)
        rows = time_cases(contestants, cases, args.d_model, (warmup, repeats, threads), say)
    add_speedups(rows)
    report |= {
        "machine_after": machine(threads),
        "settings": settings(args, threads, repeats, warmup),
        "contestants": [c.name for c in contestants],
        "cases": [c.id for c in cases],
        "results": rows,
    }
    report["targets"] = check_targets(rows)
    return report


def run(args: argparse.Namespace) -> int:
    """Measure, print the table and the targets, write JSON and PNG. Exit 0 on MISS too."""
    require_export_extra("mha bench export")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = measure(args, say)
    before, after = report["machine_before"], report["machine_after"]
    print(results_table(report["results"]))
    print(
        f"\n{before['threads']} threads for torch and ORT on {before['cores']} cores; "
        f"load average {before['loadavg'][0]:.2f} before, {after['loadavg'][0]:.2f} after"
    )
    print("targets (figures, not a gate):")
    print(target_lines(report["targets"]))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "bench-export.json", args.out / "bench-export.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 0
