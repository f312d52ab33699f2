"""`mha bench export`: torch nn.MultiheadAttention vs our eager module vs ONNX Runtime per target.

The `mha bench` dispatcher imports this module to read its flags, so torch, onnxruntime and
the export machinery are imported inside the functions that use them, never at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mha.cli import CliError
from mha.export.bench_plot import (
    OURS,
    TORCH,
    add_speedups,
    check_targets,
    ort_name,
    plot,
    results_table,
    target_lines,
)
from mha.export.cli import require_export_extra

Shape = tuple[int, int]
SHAPES: tuple[Shape, ...] = ((1, 16), (1, 128), (8, 128), (1, 1024))
QUICK_SHAPES: tuple[Shape, ...] = ((1, 8), (2, 16))
EXPORT_TARGETS = ("ort", "onnx", "none")
PADDED_FRACTION = 0.25  # the last quarter of the keys of every sample is padding
BLOCK = 5  # consecutive timed runs of one contestant before the next one takes its turn
QUIET_WINDOWS, QUIET_WINDOW_SECONDS, SETTLE_MAX_SECONDS = 4, 0.005, 0.5  # see settle()


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


@dataclass(frozen=True)
class Case:
    """One input: (B, L) self-attention, with or without a key padding mask."""

    batch: int
    length: int
    padded: bool

    @property
    def id(self) -> str:
        return f"B{self.batch}-L{self.length}" + ("-padded" if self.padded else "")

    def inputs(self, d_model: int) -> tuple[np.ndarray, np.ndarray | None]:
        """fp32 query (B, L, E) and the bool (B, L) key_padding_mask (None = no mask)."""
        rng = np.random.default_rng([self.batch, self.length])
        query = rng.standard_normal((self.batch, self.length, d_model)).astype(np.float32)
        if not self.padded:
            return query, None
        mask = np.zeros((self.batch, self.length), dtype=bool)
        mask[:, self.length - int(self.length * PADDED_FRACTION) :] = True
        return query, mask


Call = Callable[[], Any]


@dataclass
class Contestant:
    """A named way to compute the attention output: prepare(query, mask) -> a timed call."""

    name: str
    prepare: Callable[[np.ndarray, np.ndarray | None], Call]
    to_numpy: Callable[[Any], np.ndarray]


def torch_mha(module):
    """torch.nn.MultiheadAttention (batch_first, eval) holding our module's weights."""
    import torch

    cfg = module.config
    theirs = torch.nn.MultiheadAttention(
        cfg.d_model, cfg.num_heads, bias=cfg.bias, batch_first=True
    )
    with torch.no_grad():
        projections = (module.q_proj, module.k_proj, module.v_proj)
        theirs.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        theirs.out_proj.weight.copy_(module.out_proj.weight)
        if cfg.bias:
            theirs.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
            theirs.out_proj.bias.copy_(module.out_proj.bias)
    return theirs.eval()


def torch_contestants(module) -> list[Contestant]:
    """torch's nn.MultiheadAttention (need_weights=False) and our eager module, same weights."""
    import torch

    theirs = torch_mha(module)

    def prepare_theirs(query: np.ndarray, mask: np.ndarray | None) -> Call:
        q, m = torch.from_numpy(query), None if mask is None else torch.from_numpy(mask)
        return lambda: theirs(q, q, q, key_padding_mask=m, need_weights=False)[0]

    def prepare_ours(query: np.ndarray, mask: np.ndarray | None) -> Call:
        q, m = torch.from_numpy(query), None if mask is None else torch.from_numpy(mask)
        return lambda: module(q, key_padding_mask=m)[0]

    return [
        Contestant(TORCH, prepare_theirs, lambda out: out.numpy()),
        Contestant(OURS, prepare_ours, lambda out: out.numpy()),
    ]


def session_options(threads: int):
    """ORT options: the same thread count as torch; everything else ORT's defaults."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # sequential execution: no inter-op pool is used
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def ort_contestants(models: dict[str, Path], threads: int) -> list[Contestant]:
    """One ONNX Runtime CPU session per export target."""
    import onnxruntime as ort

    contestants = []
    for target, path in models.items():
        session = ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )

        def prepare(query: np.ndarray, mask: np.ndarray | None, session=session) -> Call:
            # The graph input is always present: "no mask" is all-False, as the server feeds it.
            keep = np.zeros(query.shape[:2], dtype=bool) if mask is None else mask
            feeds = {"query": query, "key_padding_mask": keep}
            return lambda: session.run(["output"], feeds)[0]

        contestants.append(Contestant(ort_name(target), prepare, np.asarray))
    return contestants


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


def settle() -> None:
    """Wait until this process's own threads are idle.

    ORT's intra-op pool keeps spinning for tens of ms after a run (and OpenMP's for a few
    ms); left alone, it takes a core from the next contestant, and a 2-thread OpenMP region
    then stalls on its descheduled thread. Several quiet windows in a row are required
    because the spinning comes in bursts.
    """
    quiet = 0
    deadline = time.perf_counter() + SETTLE_MAX_SECONDS
    while quiet < QUIET_WINDOWS and time.perf_counter() < deadline:
        cpu = time.process_time()
        time.sleep(QUIET_WINDOW_SECONDS)
        busy = time.process_time() - cpu
        quiet = quiet + 1 if busy < 0.1 * QUIET_WINDOW_SECONDS else 0


def busy_seconds() -> float | None:
    """CPU seconds all processes have used so far (from /proc/stat; None elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed_runs(
    calls: dict[str, Call], warmup: int, repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall, calling-thread CPU) seconds per run.

    Contestants take turns in blocks, in a rotating order, so drift (other processes, clock
    changes) hits every contestant alike; each block starts on an idle process with one
    untimed call.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    names = list(calls)
    turn = 0
    while any(len(t) < repeats for t in times.values()):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            call = calls[name]
            settle()
            call()
            for _ in range(min(BLOCK, repeats - len(times[name]))):
                cpu, start = time.thread_time(), time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start, time.thread_time() - cpu))
        turn += 1
    return times


def bench_case(
    contestants: list[Contestant], case: Case, d_model: int, warmup: int, repeats: int
) -> tuple[list[dict], float | None]:
    """Per contestant: wall median, p10, p90 (ms), max |error| vs our eager output and, on one
    thread, the CPU ms per call; and the cores other processes kept busy meanwhile."""
    query, mask = case.inputs(d_model)
    calls = {c.name: c.prepare(query, mask) for c in contestants}
    outputs = {c.name: c.to_numpy(calls[c.name]()) for c in contestants}
    gc.collect()
    wall, own, busy = time.perf_counter(), time.process_time(), busy_seconds()
    times = timed_runs(calls, warmup, repeats)
    busy_after = busy_seconds()
    others = None
    if busy is not None and busy_after is not None:
        own_cpu = time.process_time() - own
        others = max(0.0, (busy_after - busy - own_cpu) / (time.perf_counter() - wall))
    reference = outputs[OURS].astype(np.float64)
    single_thread = case_threads() == 1
    rows = []
    for name, runs in times.items():
        ms = np.asarray([w for w, _ in runs]) * 1e3
        cpu_ms = float(np.median([c for _, c in runs]) * 1e3) if single_thread else None
        rows.append(
            {
                "case": case.id,
                "B": case.batch,
                "L": case.length,
                "padded": case.padded,
                "contestant": name,
                "median_ms": float(np.median(ms)),
                "p10_ms": float(np.percentile(ms, 10)),
                "p90_ms": float(np.percentile(ms, 90)),
                # all work runs on the calling thread then, so this ignores time spent
                # descheduled: a figure that other processes' load barely moves
                "cpu_median_ms": cpu_ms,
                "runs": len(ms),
                "max_abs_error": float(np.abs(outputs[name] - reference).max()),
                "other_processes_cores": others,
            }
        )
    return rows, others


def case_threads() -> int:
    """torch's intra-op thread count, which measure() sets to the ORT sessions' count."""
    import torch

    return torch.get_num_threads()


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


def cores() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_shapes(values: list[str] | None, quick: bool) -> list[Shape]:
    """'8x128' -> (8, 128); the issue's shapes (or the quick ones) by default."""
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


def measure(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Export, build the contestants, time every case; the JSON report (without plot)."""
    import torch

    from mha.model import DEFAULT_SEED, AttentionConfig, seeded_model

    shapes = parse_shapes(args.shapes, args.quick)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    threads = args.threads if args.threads is not None else cores()
    if repeats < 1 or warmup < 0 or threads < 1:
        raise CliError(
            f"need --repeats >= 1, --warmup >= 0, --threads >= 1 (got "
            f"{repeats}, {warmup}, {threads})"
        )
    try:
        module = seeded_model(AttentionConfig(args.d_model, args.num_heads), DEFAULT_SEED)
    except ValueError as err:
        raise CliError(str(err)) from err
    cases = [Case(b, length, padded) for b, length in shapes for padded in (False, True)]
    report: dict[str, Any] = {"machine_before": machine(threads)}
    with repository_dir(args.repository) as repo:
        models = export_all(module, repo, say)
        contestants = torch_contestants(module) + ort_contestants(models, threads)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        rows = []
        try:
            with torch.inference_mode():
                for case in cases:
                    say(f"timing {case.id}: {len(contestants)} contestants x {repeats} runs")
                    case_rows, others = bench_case(contestants, case, args.d_model, warmup, repeats)
                    rows += case_rows
                    if others is not None:
                        say(f"  other processes kept {others:.2f} of {cores()} cores busy")
        finally:
            torch.set_num_threads(threads_before)
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
    print("targets (issue 2 section 5; figures, not a gate):")
    print(target_lines(report["targets"]))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "bench-export.json", args.out / "bench-export.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 0
