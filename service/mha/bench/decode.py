"""`mha bench decode`: decoding with the server's KV cache against recomputing every prefix.

Two exports of the same seeded weights (mha.bench.decode_models): a KV-cache step model and
a stateless causal one. Workloads: a prompt of P tokens, then `steps` steps of one token,
for 1, 8 and 32 sequences at once, each run --repeats times and pooled
(mha.bench.decode_load). Contestants, side by side in one run, one `mha serve` process
per configuration on loopback, both up at once; each repeat runs every workload for every
contestant in turn (the order rotating per repeat), so a busy minute of a shared machine
falls on all of them alike:
  cached        batching on (continuous batching of steps), the step model, server-held cache
  recompute     the same server, the causal model, each step sends the whole prefix
  batching-off  `mha serve --no-batching`, the cached workload
  echo          the bare echo (mha.bench.echo) answering each message of the cached
                workload with prebuilt zeros of a step's answer: the protocol's floor
  in-process    session.run of the step graph in this process, its own cache, 1 sequence
Figures, not a test: the machine may be shared, so bench.json records the load average
before and after, and every target is a ratio of two contestants of the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mha.bench import arguments, decode_report, report
from mha.bench.decode_load import Measured, Served, Workload, decode_in_process, decode_served
from mha.bench.decode_models import DecodeModels, ensure_models
from mha.bench.inprocess import make_session
from mha.bench.servers import ServerFailed, ServerProcess, start_echo, start_server
from mha.client import ClientError
from mha.errors import CliError

CONTESTANTS = ("cached", "recompute", "batching-off", "echo", "in-process")
SERVED = {"on": ("cached", "recompute"), "off": ("batching-off",)}  # server config -> contestants


@dataclass(frozen=True)
class Sizes:
    """The model's size and the workloads' grid."""

    d_model: int
    num_heads: int
    prompts: tuple[int, ...]
    steps: int
    sequences: tuple[int, ...]
    recompute_sequences: tuple[int, ...]  # recompute is slow: a step is a whole forward
    repeats: int  # runs of each workload, pooled: 64 steps of one sequence are few samples


FULL = Sizes(512, 8, (128, 1024), 64, (1, 8, 32), (1,), 3)
QUICK = Sizes(64, 4, (8,), 4, (1, 4), (1,), 1)  # seconds, for the test


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (d_model 64, P 8, 4 steps, 1 and 4 sequences; for tests)",
    )
    what.add_argument("--prompts", type=arguments.whole_numbers,
                      help="comma-separated prompt lengths P (default 128,1024)")  # fmt: skip
    what.add_argument("--steps", type=int, help="steps of one token after the prompt (default 64)")
    what.add_argument("--sequences", type=arguments.whole_numbers,
                      help="comma-separated sequences at once (default 1,8,32)")  # fmt: skip
    what.add_argument("--recompute-sequences", type=arguments.whole_numbers,
                      help="the same for recompute (default 1)")  # fmt: skip
    what.add_argument("--repeats", type=int, help="runs of each workload, pooled (default 3)")
    what.add_argument("--contestants", help=f"comma-separated subset of {', '.join(CONTESTANTS)}")
    what.add_argument("--d-model", type=int, help="model width (default 512)")
    what.add_argument("--num-heads", type=int, help="attention heads (default 8)")
    what.add_argument("--seed", type=int, default=0, help="random tokens' seed (default 0)")
    arguments.add_server_arguments(parser, arguments.MODELS_HELP)
    arguments.add_output_arguments(parser, Path("bench-out/decode"))


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The preset (full or --quick) with every size flag given laid over it."""
    given = {
        "d_model": args.d_model,
        "num_heads": args.num_heads,
        "prompts": args.prompts,
        "steps": args.steps,
        "sequences": args.sequences,
        "recompute_sequences": args.recompute_sequences,
        "repeats": args.repeats,
    }
    sizes = replace(
        QUICK if args.quick else FULL, **{k: v for k, v in given.items() if v is not None}
    )
    if min(sizes.steps, sizes.d_model, sizes.num_heads, sizes.repeats) < 1:
        raise CliError("--steps, --repeats, --d-model and --num-heads must be >= 1")
    return sizes


def contestants_from(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.contestants:
        return CONTESTANTS
    wanted = tuple(c.strip() for c in args.contestants.split(",") if c.strip())
    unknown = [c for c in wanted if c not in CONTESTANTS]
    if unknown or not wanted:
        raise CliError(
            f"unknown --contestants {args.contestants!r}; choose from {', '.join(CONTESTANTS)}"
        )
    return wanted


def record(
    contestant: str, server: str | None, workload: Workload, measured: Measured, width: int
) -> dict[str, Any]:
    """One point of bench.json (fields: mha.bench.decode_report)."""
    steps_ms = np.array(measured.step_s) * 1e3
    p50, p90, p99, top = (float(np.percentile(steps_ms, q)) for q in (50, 90, 99, 100))
    held = contestant not in ("recompute", "echo")  # what the cache rows of every sequence take
    rows_bytes = 2 * width * 4 * workload.context * workload.sequences if held else None
    prefill_ms = float(np.median(measured.prefill_s)) * 1e3 if measured.prefill_s else None
    return {
        "contestant": contestant,
        "server": server,
        "prompt": workload.prompt,
        "steps": workload.steps,
        "sequences": workload.sequences,
        "tokens": measured.tokens,
        "seconds": measured.seconds,
        "tokens_per_s": measured.tokens / measured.seconds,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": top,
        "prefill_p50_ms": prefill_ms,
        "mean_batch": measured.server.get("mean_batch"),
        "padding_fraction": measured.server.get("padding_fraction"),
        "cache_bytes": measured.server.get("cache_bytes"),
        "cache_rows_bytes": rows_bytes,
        "refused": measured.refused,  # UNAVAILABLE refusals sent again (decode_load)
    }


class DecodeBench:
    """Runs every contestant's workloads; keeps the records and sequence 0's answers."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, models: DecodeModels) -> None:
        self.args, self.sizes, self.models = args, sizes, models
        self.records: list[dict[str, Any]] = []
        self.servers: dict[str, dict[str, Any]] = {}
        self.first_rows: dict[tuple[str, int], np.ndarray] = {}  # (contestant, P) -> row
        self.order: list[dict[str, Any]] = []  # the runs in the order they were measured

    @property
    def repeats(self) -> range:
        return range(self.sizes.repeats)

    def workloads(self, contestant: str) -> list[Workload]:
        counts = {"recompute": self.sizes.recompute_sequences, "in-process": (1,)}
        return [
            Workload(p, self.sizes.steps, n)
            for p in self.sizes.prompts
            for n in counts.get(contestant, self.sizes.sequences)
        ]

    def keep(
        self, contestant: str, server: str | None, workload: Workload, measured: Measured
    ) -> None:
        point = record(contestant, server, workload, measured, self.sizes.d_model)
        self.records.append(point)
        self.first_rows.setdefault((contestant, workload.prompt), measured.first_row)
        refused = f"  {measured.refused} refusals sent again" if measured.refused else ""
        print(
            f"{contestant:<12} {workload.label:<12} {point['tokens_per_s']:9.1f} tokens/s  "
            f"step p50 {point['p50_ms']:.2f} ms  p99 {point['p99_ms']:.2f} ms{refused}",
            file=sys.stderr,
            flush=True,
        )

    def run(self, wanted: tuple[str, ...]) -> None:
        """Every contestant's workloads, interleaved: both servers up at once; each repeat
        runs every workload for every contestant in turn, the order rotating per repeat."""
        log_dir = Path(tempfile.mkdtemp(prefix="mha-bench-decode-"))
        started: dict[str, ServerProcess] = {}
        try:
            runners: dict[str, Callable[[Workload, str], Measured]] = {}
            places: dict[str, str | None] = {}
            if "in-process" in wanted:
                runners["in-process"], places["in-process"] = self._in_process(), None
            for config, contestants in SERVED.items():
                chosen = [c for c in contestants if c in wanted]
                if not chosen:
                    continue
                started[config] = server = self._start(config, log_dir)
                for contestant in chosen:
                    runners[contestant] = self._served(server, contestant)
                    places[contestant] = config
            if "echo" in wanted:
                print("starting the echo ...", file=sys.stderr, flush=True)
                started["echo"] = start_echo(self.models.kv_dir, log_dir=log_dir)
                runners["echo"], places["echo"] = self._served(started["echo"], "echo"), "echo"
            self._interleave(runners, places)
            for config, server in started.items():
                self.servers[config] = {
                    "startup_s": server.startup_s,
                    "rss_mb": server.rss_mb(),
                    "flags": server.flags,
                    "log": str(server.log_path),
                }
        finally:
            for server in started.values():
                server.stop()

    def _interleave(
        self,
        runners: dict[str, Callable[[Workload, str], Measured]],
        places: dict[str, str | None],
    ) -> None:
        names = list(runners)
        plans = {name: self.workloads(name) for name in names}
        every = list(dict.fromkeys(w for name in names for w in plans[name]))
        runs: dict[tuple[str, Workload], list[Measured]] = {}
        for repeat in self.repeats:
            turn = repeat % len(names)
            for workload in every:
                for name in names[turn:] + names[:turn]:
                    if workload in plans[name]:
                        tag = f"{name}-{workload.prompt}-{workload.sequences}-{repeat}"
                        runs.setdefault((name, workload), []).append(runners[name](workload, tag))
                        self.order.append(
                            {"contestant": name, "workload": workload.label, "repeat": repeat}
                        )
        for name in names:
            for workload in plans[name]:
                self.keep(name, places[name], workload, Measured.pooled(runs[name, workload]))

    def _in_process(self) -> Callable[[Workload, str], Measured]:
        session = make_session(self.models.kv_dir / "model.onnx", self.args.threads)
        width, seed = self.sizes.d_model, self.args.seed
        decode_in_process(session, Workload(min(self.sizes.prompts), 2, 1), width, seed)  # warm-up
        return lambda workload, _tag: decode_in_process(session, workload, width, seed)

    def _start(self, config: str, log_dir: Path) -> ServerProcess:
        print(f"starting mha serve ({config}) ...", file=sys.stderr, flush=True)
        return start_server(
            self.models.repository,
            config,
            threads=self.args.threads,
            extra=list(self.args.server_arg),
            log_dir=log_dir,
        )

    def _served(
        self, server: ServerProcess, contestant: str
    ) -> Callable[[Workload, str], Measured]:
        cached = contestant != "recompute"
        model = self.models.kv if cached else self.models.full
        metrics = server.metrics if server.metrics_port else (lambda: "")  # the echo has none
        how = Served(server.url, model, cached, metrics)
        width, seed = self.sizes.d_model, self.args.seed
        warm_up = Workload(min(self.sizes.prompts), 2, max(self.sizes.sequences))
        decode_served(how, warm_up, width, seed, f"{contestant}-warm-up")
        return lambda workload, tag: decode_served(how, workload, width, seed, tag)

    def agreement(self) -> list[dict[str, Any]]:
        """Max |diff| of sequence 0's last output between cached and each other contestant
        (the echo's zeros aside)."""
        found = []
        for (contestant, prompt), row in self.first_rows.items():
            cached = self.first_rows.get(("cached", prompt))
            if contestant not in ("cached", "echo") and cached is not None:
                diff = float(np.abs(row.astype(np.float64) - cached).max())
                found.append(
                    {"prompt": prompt, "pair": f"cached vs {contestant}", "max_abs_diff": diff}
                )
        return found


def run(args: argparse.Namespace) -> int:
    sizes, wanted = sizes_from(args), contestants_from(args)
    repository = args.repository or args.out / "models"
    models = ensure_models(repository, sizes.d_model, sizes.num_heads)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = DecodeBench(args, sizes, models)
    started, load_before = time.time(), os.getloadavg()
    try:
        bench.run(wanted)
    except (ServerFailed, ClientError) as err:  # a server that died, a step that failed
        raise CliError(" ".join(str(err).split())) from None
    document: dict[str, Any] = {
        "preset": "quick" if args.quick else "full",
        "sizes": asdict(sizes),
        "started": started,
        "seconds": time.time() - started,
        "machine": arguments.machine(load_before),
        "models": {"repository": str(repository), "kv": models.kv, "full": models.full},
        "servers": bench.servers,
        "points": bench.records,
        "agreement": bench.agreement(),
        "order": bench.order,
    }
    document["targets"] = print_tables(document)
    report.write_json(args.out / "bench.json", document)
    if not args.no_plot:
        title = f"mha bench decode (d_model {sizes.d_model}, {sizes.steps} steps)"
        decode_report.write_plot(bench.records, args.out / "bench.png", title)
    print(f"\nwrote {args.out / 'bench.json'}" + ("" if args.no_plot else " and bench.png"))
    return 0


def print_tables(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Print every table; return the target checks."""
    points, load = document["points"], document["machine"]
    print(report.load_heading("decode figures", load))
    print(decode_report.figures_table(points))
    recompute_text, targets = decode_report.cache_vs_recompute(points)
    print("\nKV cache vs recompute\n" + recompute_text)
    batching_text, batching_targets = decode_report.batching_on_vs_off(points)
    print("\ncontinuous batching on vs off\n" + batching_text)
    floor_text, floor_targets = decode_report.served_vs_floor(points)
    print("\ngRPC step vs the protocol floor and the in-process ceiling\n" + floor_text)
    print("\nsame answers\n" + decode_report.agreement_table(document["agreement"]))
    targets += batching_targets + floor_targets
    print("\ntargets\n" + report.targets_table(targets))
    return targets
