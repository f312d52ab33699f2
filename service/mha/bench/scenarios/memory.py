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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mha import contract
from mha.bench.framework import models, options, report
from mha.bench.framework.contenders import Contenders
from mha.bench.framework.report import Row, ratio, target
from mha.bench.framework.rounds import run_rounds
from mha.bench.framework.sequences import (
    DTYPE,
    Measured,
    Request,
    SequencePlan,
    Served,
    agreement,
    run_pair_scenario,
    run_sequences,
)
from mha.client import SequenceStep, core

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


FLAGS: tuple[options.Flag, ...] = (
    ("--quick", dict(action="store_true", help="tiny sizes (d_model 64, S 8, 4 steps, 1 and 4 "
                     "sequences; for tests)")),
    ("--memories", dict(type=options.whole_numbers, help="memory lengths S (default 64,512)")),
    ("--steps", dict(type=int, help="steps of one query token (default 64)")),
    ("--sequences", dict(type=options.whole_numbers, help="sequences at once (default 1,16)")),
    ("--d-model", dict(type=int, help="model width, = kdim = vdim (default 512)")),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_sized_arguments(parser, FLAGS, Path("bench-out/memory"))


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
    document, sizes, pair = run_pair_scenario(
        args, models.MEMORY_PAIR, QUICK if args.quick else FULL,
        lambda sizes, pair, contenders: measure(args, sizes, pair, contenders),
    )  # fmt: skip
    document["models"] = {"repository": str(pair.repository), "memory": pair.names[0],
                          "cross": pair.names[1],
                          "weights_sha256": pair.configs[0].get("weights_sha256")}  # fmt: skip
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


FIGURES: tuple[report.Column, ...] = (
    ("contestant", "contestant"), ("S", "memory"), ("sequences", "sequences"), ("steps", "steps"),
    ("tokens/s", "tokens_per_s"), ("step p50 ms", "p50_ms"), ("step p99 ms", "p99_ms"),
    ("first step p50 ms", "first_step_p50_ms"),
    ("request kB/step", report.scaled("request_bytes_per_step", KB)),
    ("mean batch", "mean_batch"), ("memory kB (server)", report.scaled("cache_bytes", KB)),
)  # fmt: skip
RESEND: tuple[report.Column, ...] = (
    *report.workload_columns(("S", "memory"), ("sequences", "sequences")),
    *report.paired("cached", "resend", "tokens_per_s", "tokens/s"),
    report.ratio_column("cached/resend", "tokens_per_s"),
    *report.paired("cached", "resend", "p50_ms", "p50 ms"),
    *report.paired("cached", "resend", "request_bytes_per_step", "bytes/step"),
    report.ratio_column("resend/cached bytes", "request_bytes_per_step", inverse=True),
)  # fmt: skip
AGREEMENT_COLUMNS = (("S", "memory"), ("sequences", "sequences"), ("contestants", "pair"),
                     ("max abs diff, sequence 0's last output row", "max_abs_diff"))  # fmt: skip


def print_tables(document: Row) -> list[Row]:
    """Print every table; return the targets."""
    points, agreed = document["points"], document["agreement"]
    print(report.load_heading("memory figures", document["machine"]))
    print(report.columns_table(points, FIGURES))
    resend = report.versus(points, "cached", "resend", ("memory", "sequences"))
    print("\nheld memory vs resending it\n" + report.columns_table(resend, RESEND))
    most = (max((r["memory"] for r in points), default=0),
            max((r["sequences"] for r in points), default=0))  # fmt: skip
    targets = [target(f"S={most[0]} x{most[1]}: cached tokens/s >= {CACHED_VS_RESEND:g}x resend",
                      ratio(v["top"], v["bottom"], "tokens_per_s"), CACHED_VS_RESEND, True)
               for v in resend
               if (v["bottom"]["memory"], v["bottom"]["sequences"]) == most]  # fmt: skip
    print("\nsame answers\n" + report.columns_table(agreed, AGREEMENT_COLUMNS))
    worst = max((a["max_abs_diff"] for a in agreed), default=float("nan"))
    targets.append(target(f"answers agree: max abs diff <= {AGREEMENT:g}", worst, AGREEMENT, False))
    print("\ntargets\n" + report.targets_table(targets))
    return targets
