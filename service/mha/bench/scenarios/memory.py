"""`mha bench memory`: stepping over a server-held cross-attention memory vs resending it.

Two exports of the same seeded weights (models.MEMORY_PAIR): a cross-attention memory model
(`--cross --kv-cache`) and the stateless cross model (`--cross`). Workloads: memories of S
tokens (the last S/8 padding, so the mask matters), `steps` steps of one query token, for 1
and 16 sequences at once, each run --repeats times and pooled. Contenders, on one
`mha serve` with batching on, taking turns workload by workload, the order rotating per
repeat (so a busy spell of a shared machine hits both):
  cached  the memory model: the memory with the first step only, the server holds it
  resend  the stateless cross model: query + key + value + mask with every step
Both over one ModelStreamInfer stream per sequence; every step is timed, the first
included (cached: the request that brings the memory). The target is a ratio of the two.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mha import contract
from mha.bench.framework import models, options, report
from mha.bench.framework.contenders import Contenders, ServerFailed
from mha.bench.framework.report import Row, find, ratio, table, target, value
from mha.bench.framework.rounds import run_rounds
from mha.bench.framework.sequences import (
    DTYPE,
    Measured,
    Request,
    SequencePlan,
    Served,
    agreement,
    run_sequences,
)
from mha.client import ClientError, SequenceStep, core
from mha.errors import CliError

CONTENDERS = ("cached", "resend")
CONFIG = "on"  # batching on: steps of different sequences run as one session call
PADDED_SHARE = 8  # the last S // 8 memory tokens are padding
CACHED_VS_RESEND = 5.0  # cached tokens/s over resend's, at the longest memory, most sequences
AGREEMENT = 1e-4  # max |diff| of two fp32 exports of the same weights (parity is 1e-5 each)
KB = 1e3


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


@dataclass(frozen=True)
class Workload:
    """`sequences` sequences at once, each `steps` steps of one token over S memory tokens."""

    memory: int  # S
    steps: int
    sequences: int

    def plans(self, cached: bool, width: int, seed: int, tag: str) -> list[SequencePlan]:
        """Each sequence's steps, seeded by (seed, S, index): sequence i of a memory length
        is the same for every contender and sequence count, so answers can be compared."""
        found = []
        for i in range(self.sequences):
            rng = np.random.default_rng((seed, self.memory, i))
            key, val = (rng.standard_normal((1, self.memory, width)).astype(DTYPE) for _ in "kv")
            mask = np.zeros((1, self.memory), bool)
            mask[0, self.memory - self.memory // PADDED_SHARE :] = True
            held = {contract.KEY: key, contract.VALUE: val, contract.KEY_PADDING_MASK: mask}
            queries = rng.standard_normal((1, self.steps, width)).astype(DTYPE)
            steps: list[Request] = []
            for k in range(self.steps):
                query = {contract.QUERY: queries[:, k : k + 1]}
                if not cached:
                    steps.append(({**query, **held}, None))
                else:
                    sent = {**query, **held} if k == 0 else query
                    steps.append((sent, SequenceStep(f"{tag}-{i}", start=k == 0)))
            found.append(SequencePlan(None, steps))
        return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (d_model 64, S 8, 4 steps, 1 and 4 sequences; for tests)",
    )
    what.add_argument(
        "--memories", type=options.whole_numbers, help="memory lengths S (default 64,512)"
    )
    what.add_argument("--steps", type=int, help="steps of one query token (default 64)")
    what.add_argument(
        "--sequences", type=options.whole_numbers, help="sequences at once (default 1,16)"
    )
    what.add_argument("--repeats", type=int, help="runs of each workload, pooled (default 3)")
    what.add_argument("--d-model", type=int, help="model width, = kdim = vdim (default 512)")
    what.add_argument("--num-heads", type=int, help="attention heads (default 8)")
    what.add_argument("--seed", type=int, default=0, help="random tensors' seed (default 0)")
    options.add_server_arguments(parser, options.MODELS_HELP)
    options.add_output_arguments(parser, Path("bench-out/memory"))


def request_bytes(model: str, plan: SequencePlan) -> list[int]:
    """The serialized ModelInferRequest size of every step of one sequence, as sent."""
    return [
        len(core.infer_request(model, inputs, sequence=control).SerializeToString())
        for inputs, control in plan.steps
    ]


def measure(
    args: argparse.Namespace, sizes: Sizes, pair: models.Pair, contenders: Contenders
) -> dict[str, Any]:
    """One server for both contenders, warmed up; the rounds; the document's figures."""
    width, seed = sizes.d_model, args.seed
    server = contenders.serve(CONFIG, pair.repository, CONFIG)
    served = {
        name: Served(server.url, pair.names[index], name == "cached", server.metrics)
        for index, name in enumerate(CONTENDERS)
    }
    warm_up = Workload(min(sizes.memories), 2, max(sizes.sequences))
    for name, how in served.items():
        run_sequences(how, warm_up.plans(name == "cached", width, seed, f"warm-up-{name}"))
    runners = {
        name: (
            lambda w, tag, name=name: run_sequences(
                served[name], w.plans(name == "cached", width, seed, tag)
            )
        )
        for name in CONTENDERS
    }
    runs, _ = run_rounds(
        runners,
        lambda _: [Workload(m, sizes.steps, n) for m in sizes.memories for n in sizes.sequences],
        sizes.repeats,
        lambda name, w, r: f"{name}-{w.memory}-{w.sequences}-{r}",
    )
    records, rows = [], {}
    for (name, workload), measured in sorted(
        runs.items(), key=lambda kv: CONTENDERS.index(kv[0][0])
    ):
        pooled = Measured.pooled(measured)
        [first] = Workload(workload.memory, workload.steps, 1).plans(
            name == "cached", width, seed, "size"
        )
        records.append(
            record(name, workload, pooled, request_bytes(served[name].model, first), width)
        )
        rows[name, workload.memory, workload.sequences] = pooled.first_row
        r = records[-1]
        report.say(
            f"{name:<7} S={workload.memory} x{workload.sequences:<4} {r['tokens_per_s']:9.1f} "
            f"tokens/s  step p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
            f"{r['request_bytes_per_step']:.0f} B/step"
        )
    return {
        "servers": {CONFIG: server.record()},
        "points": records,
        "agreement": agreement(rows, ("memory", "sequences")),
    }


def record(name: str, workload: Workload, measured: Measured, sent: list[int], width: int) -> Row:
    """One point of bench.json; sent: the bytes of each step."""
    held = name == "cached"  # what the projected memories of every sequence take
    return {
        "contestant": name,
        "memory": workload.memory,
        "steps": workload.steps,
        "sequences": workload.sequences,
        **measured.record(),
        "first_step_p50_ms": float(np.median(measured.first_s)) * 1e3,
        "request_bytes_per_step": float(np.mean(sent)),
        "request_bytes_first": sent[0],
        "request_bytes_later": sent[-1],
        "memory_rows_bytes": 2 * width * 4 * workload.memory * workload.sequences if held else None,
    }


def run(args: argparse.Namespace) -> int:
    sizes = options.laid_over(
        QUICK if args.quick else FULL, args, ("steps", "d_model", "num_heads", "repeats")
    )
    repository = args.repository or args.out / "models"
    pair = models.ensure_pair(models.MEMORY_PAIR, repository, sizes.d_model, sizes.num_heads)
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    try:
        with Contenders(args.out / "logs", args.threads, args.server_arg) as contenders:
            figures = measure(args, sizes, pair, contenders)
    except (ServerFailed, ClientError) as err:  # a server that died, a step that failed
        raise CliError(" ".join(str(err).split())) from None
    document: dict[str, Any] = {
        "preset": "quick" if args.quick else "full",
        "sizes": options.sizes_record(sizes),
        "started": started,
        "seconds": time.time() - started,
        "machine": report.machine(load_before),
        "models": {
            "repository": str(repository),
            "memory": pair.names[0],
            "cross": pair.names[1],
            "weights_sha256": pair.configs[0].get("weights_sha256"),
        },
        **figures,
    }
    document["targets"] = print_tables(document)
    title = f"mha bench memory (d_model {sizes.d_model}, {sizes.steps} steps of 1 token)"
    panels = (("tokens_per_s", "tokens/s (all sequences)", None), ("p50_ms", "step p50 ms", None))
    plot = (
        None
        if args.no_plot
        else lambda path: report.lines_plot(
            "memory", document["points"], "memory", "memory tokens S", panels, path, title
        )
    )
    report.write(args.out, document, plot=plot)
    return 0


def print_tables(document: Row) -> list[Row]:
    """Print every table; return the targets."""
    points = document["points"]
    print(report.load_heading("memory figures", document["machine"]))
    rows = [
        [
            r["contestant"],
            r["memory"],
            r["sequences"],
            r["steps"],
            r["tokens_per_s"],
            r["p50_ms"],
            r["p99_ms"],
            r["first_step_p50_ms"],
            r["request_bytes_per_step"] / KB,
            r["mean_batch"],
            None if r["cache_bytes"] is None else r["cache_bytes"] / KB,
        ]
        for r in points
    ]
    print(
        table(
            [
                "contestant",
                "S",
                "sequences",
                "steps",
                "tokens/s",
                "step p50 ms",
                "step p99 ms",
                "first step p50 ms",
                "request kB/step",
                "mean batch",
                "memory kB (server)",
            ],
            rows,
        )
    )
    rows, targets = [], []
    longest = max((r["memory"] for r in points), default=0)
    most = max((r["sequences"] for r in points), default=0)
    for resend in (r for r in points if r["contestant"] == "resend"):
        cached = find(
            points, contestant="cached", memory=resend["memory"], sequences=resend["sequences"]
        )
        times = ratio(cached, resend, "tokens_per_s")
        rows.append(
            [
                resend["memory"],
                resend["sequences"],
                value(cached, "tokens_per_s"),
                resend["tokens_per_s"],
                times,
                value(cached, "p50_ms"),
                resend["p50_ms"],
                value(cached, "request_bytes_per_step"),
                resend["request_bytes_per_step"],
                ratio(resend, cached, "request_bytes_per_step"),
            ]
        )
        if (resend["memory"], resend["sequences"]) == (longest, most):
            name = f"S={longest} x{most}: cached tokens/s >= {CACHED_VS_RESEND:g}x resend"
            targets.append(target(name, times, CACHED_VS_RESEND, True))
    print(
        "\nheld memory vs resending it\n"
        + table(
            [
                "S",
                "sequences",
                "cached tokens/s",
                "resend tokens/s",
                "cached/resend",
                "cached p50 ms",
                "resend p50 ms",
                "cached bytes/step",
                "resend bytes/step",
                "resend/cached bytes",
            ],
            rows,
        )
    )
    agreed = document["agreement"]
    rows = [[a["memory"], a["sequences"], a["pair"], a["max_abs_diff"]] for a in agreed]
    print(
        "\nsame answers\n"
        + table(
            ["S", "sequences", "contestants", "max abs diff, sequence 0's last output row"], rows
        )
    )
    worst = max((a["max_abs_diff"] for a in agreed), default=float("nan"))
    targets.append(target(f"answers agree: max abs diff <= {AGREEMENT:g}", worst, AGREEMENT, False))
    print("\ntargets\n" + report.targets_table(targets))
    return targets
