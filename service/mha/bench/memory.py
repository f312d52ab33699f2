"""`mha bench memory`: stepping over a server-held cross-attention memory vs resending it.

Two exports of the same seeded weights (mha.bench.memory_models): a cross-attention memory
model (`--cross --kv-cache`) and the stateless cross model (`--cross`). Workloads: memories
of S tokens, `steps` steps of one query token, for 1 and 16 sequences at once, each run
--repeats times and pooled (mha.bench.memory_load). Contestants, on one `mha serve` with
batching on, taking turns workload by workload (so a busy spell of a shared machine hits
both):
  cached  the memory model: the memory with the first step only, the server holds it
  resend  the stateless cross model: query + key + value + mask with every step
Both over one ModelStreamInfer stream per sequence. Figures, not a test: bench.json records
the load average before and after, and the target is a ratio of the two in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mha.bench import arguments, memory_report, report
from mha.bench.decode_load import Measured, Served
from mha.bench.memory_load import MemoryWorkload, request_bytes, run_served, sequence_data
from mha.bench.memory_models import MemoryModels, ensure_models
from mha.bench.servers import ServerFailed, ServerProcess, start_server
from mha.client import ClientError
from mha.errors import CliError

CONTESTANTS = ("cached", "resend")
CONFIG = "on"  # batching on: steps of different sequences run as one session call


@dataclass(frozen=True)
class Sizes:
    """The model's size and the workloads' grid."""

    d_model: int
    num_heads: int
    memories: tuple[int, ...]  # S, memory tokens per sequence
    steps: int
    sequences: tuple[int, ...]
    repeats: int  # runs of each workload, pooled: 64 steps of one sequence are few samples


FULL = Sizes(512, 8, (64, 512), 64, (1, 16), 3)
QUICK = Sizes(64, 4, (8,), 4, (1, 4), 1)  # seconds, for the test


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (d_model 64, S 8, 4 steps, 1 and 4 sequences; for tests)",
    )
    what.add_argument(
        "--memories", type=arguments.whole_numbers, help="memory lengths S (default 64,512)"
    )
    what.add_argument("--steps", type=int, help="steps of one query token (default 64)")
    what.add_argument(
        "--sequences", type=arguments.whole_numbers, help="sequences at once (default 1,16)"
    )
    what.add_argument("--repeats", type=int, help="runs of each workload, pooled (default 3)")
    what.add_argument("--d-model", type=int, help="model width, = kdim = vdim (default 512)")
    what.add_argument("--num-heads", type=int, help="attention heads (default 8)")
    what.add_argument("--seed", type=int, default=0, help="random tensors' seed (default 0)")
    arguments.add_server_arguments(parser, arguments.MODELS_HELP)
    arguments.add_output_arguments(parser, Path("bench-out/memory"))


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The preset (full or --quick) with every size flag given laid over it."""
    names = ("d_model", "num_heads", "memories", "steps", "sequences", "repeats")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    sizes = replace(QUICK if args.quick else FULL, **given)
    if min(sizes.steps, sizes.d_model, sizes.num_heads, sizes.repeats) < 1:
        raise CliError("--steps, --repeats, --d-model and --num-heads must be >= 1")
    return sizes


def record(
    contestant: str, workload: MemoryWorkload, measured: Measured, sent_bytes: list[int], width: int
) -> dict[str, Any]:
    """One point of bench.json (fields: mha.bench.memory_report); sent_bytes: per step."""
    steps_ms = np.array(measured.step_s) * 1e3
    p50, p90, p99, top = (float(np.percentile(steps_ms, q)) for q in (50, 90, 99, 100))
    held = contestant == "cached"  # what the projected memories of every sequence take
    return {
        "contestant": contestant,
        "memory": workload.memory,
        "steps": workload.steps,
        "sequences": workload.sequences,
        "tokens": measured.tokens,
        "seconds": measured.seconds,
        "tokens_per_s": measured.tokens / measured.seconds,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": top,
        "first_step_p50_ms": float(np.median(measured.prefill_s)) * 1e3,
        "request_bytes_per_step": float(np.mean(sent_bytes)),
        "request_bytes_first": sent_bytes[0],
        "request_bytes_later": sent_bytes[-1],
        "mean_batch": measured.server.get("mean_batch"),
        "padding_fraction": measured.server.get("padding_fraction"),
        "cache_bytes": measured.server.get("cache_bytes"),
        "memory_rows_bytes": 2 * width * 4 * workload.memory * workload.sequences if held else None,
    }


class MemoryBench:
    """Runs both contestants' workloads; keeps the records and sequence 0's answers."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, models: MemoryModels) -> None:
        self.args, self.sizes, self.models = args, sizes, models
        self.records: list[dict[str, Any]] = []
        self.servers: dict[str, dict[str, Any]] = {}
        self.last_rows: dict[tuple[str, int, int], np.ndarray] = {}  # (contestant, S, n) -> row

    def workloads(self) -> list[MemoryWorkload]:
        sizes = self.sizes
        return [MemoryWorkload(s, sizes.steps, n) for s in sizes.memories for n in sizes.sequences]

    def contestant(self, server: ServerProcess, name: str) -> Served:
        cached = name == "cached"
        model = self.models.memory if cached else self.models.cross
        return Served(server.url, model, cached, server.metrics)

    def measure(self, how: Served, name: str, workload: MemoryWorkload) -> None:
        """Run one workload --repeats times, pooled; count sequence 0's request bytes."""
        width, seed = self.sizes.d_model, self.args.seed
        tag = f"{name}-{workload.memory}-{workload.sequences}"
        runs = [
            run_served(how, workload, width, seed, f"{tag}-{r}") for r in range(self.sizes.repeats)
        ]
        [first] = sequence_data(replace(workload, sequences=1), width, seed)
        sent_bytes = request_bytes(how, first, workload.steps, f"{tag}-0-0")
        measured = Measured.pooled(runs)
        point = record(name, workload, measured, sent_bytes, width)
        self.records.append(point)
        self.last_rows[(name, workload.memory, workload.sequences)] = measured.first_row
        print(
            f"{name:<7} {workload.label:<10} {point['tokens_per_s']:9.1f} tokens/s  "
            f"step p50 {point['p50_ms']:.2f} ms  p99 {point['p99_ms']:.2f} ms  "
            f"{point['request_bytes_per_step']:.0f} B/step",
            file=sys.stderr,
            flush=True,
        )

    def run(self) -> None:
        """One `mha serve` for both contestants, taking turns per workload; stopped after."""
        print(f"starting mha serve ({CONFIG}) ...", file=sys.stderr, flush=True)
        args, logs = self.args, Path(tempfile.mkdtemp(prefix="mha-bench-memory-"))
        server = start_server(
            self.models.repository,
            CONFIG,
            threads=args.threads,
            extra=args.server_arg,
            log_dir=logs,
        )
        try:
            served = {name: self.contestant(server, name) for name in CONTESTANTS}
            warm_up = MemoryWorkload(min(self.sizes.memories), 2, max(self.sizes.sequences))
            for name, how in served.items():
                run_served(how, warm_up, self.sizes.d_model, args.seed, f"warm-up-{name}")
            for workload in self.workloads():
                for name, how in served.items():
                    self.measure(how, name, workload)
            self.servers[CONFIG] = {"startup_s": server.startup_s, "rss_mb": server.rss_mb(),
                                    "flags": server.flags, "log": str(server.log_path)}  # fmt: skip
        finally:
            server.stop()

    def agreement(self) -> list[dict[str, Any]]:
        """Max |diff| of sequence 0's last output row, cached vs resend, per workload."""
        found = []
        for (name, memory, sequences), row in self.last_rows.items():
            cached = self.last_rows.get(("cached", memory, sequences))
            if name != "cached" and cached is not None:
                diff = float(np.abs(row.astype(np.float64) - cached).max())
                found.append({"memory": memory, "sequences": sequences,
                              "pair": f"cached vs {name}", "max_abs_diff": diff})  # fmt: skip
        return found


def run(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    repository = args.repository or args.out / "models"
    models = ensure_models(repository, sizes.d_model, sizes.num_heads)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = MemoryBench(args, sizes, models)
    started, load_before = time.time(), os.getloadavg()
    try:
        bench.run()
    except (ServerFailed, ClientError) as err:  # a server that died, a step that failed
        raise CliError(" ".join(str(err).split())) from None
    machine = arguments.machine(load_before)
    document: dict[str, Any] = {
        "preset": "quick" if args.quick else "full",
        "sizes": asdict(sizes),
        "started": started,
        "seconds": time.time() - started,
        "machine": machine,
        "models": {
            "repository": str(repository),
            "memory": models.memory,
            "cross": models.cross,
            "weights_sha256": models.memory_config.get("weights_sha256"),
        },
        "servers": bench.servers,
        "points": bench.records,
        "agreement": bench.agreement(),
    }
    document["targets"] = print_tables(document)
    path = args.out / "bench.json"
    report.write_json(path, document)
    if not args.no_plot:
        title = f"mha bench memory (d_model {sizes.d_model}, {sizes.steps} steps of 1 token)"
        memory_report.write_plot(bench.records, args.out / "bench.png", title)
    print(f"\nwrote {path}" + ("" if args.no_plot else " and bench.png"))
    return 0


def print_tables(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Print every table; return the target checks."""
    points, load = document["points"], document["machine"]
    print(report.load_heading("memory figures", load))
    print(memory_report.figures_table(points))
    resend_text, targets = memory_report.cached_vs_resend(points)
    print("\nheld memory vs resending it\n" + resend_text)
    agreement_text, agreement_targets = memory_report.agreement_table(document["agreement"])
    print("\nsame answers\n" + agreement_text)
    targets += agreement_targets
    print("\ntargets\n" + report.targets_table(targets))
    return targets
