"""`mha bench decode`: decoding with the server's KV cache against recomputing every prefix.

Two exports of the same seeded weights (models.DECODE_PAIR): a KV-cache step model and a
stateless causal one. Workloads: a prompt of P tokens, then `steps` steps of one token,
for 1, 8 and 32 sequences at once, each run --repeats times and pooled. Contenders, side
by side in one run, one `mha serve` per configuration on loopback, all up at once, taking
turns workload by workload, the order rotating per repeat (mha.bench.framework.rounds):
  cached        batching on (continuous batching of steps), the step model, server-held cache
  recompute     the same server, the causal model, each step sends the whole prefix
  batching-off  `mha serve --no-batching`, the cached workload
  echo          the bare echo answering each message of the cached workload with prebuilt
                zeros of a step's answer: the protocol's floor
  in-process    session.run of the step graph in this process, its own cache, 1 sequence
Then the mixed workload (scenarios.decode.mixed) against batching on and off: sequences
decoding while long prompts arrive. Figures, not a test: every target is a ratio of two
contenders (or of two figures of one) of the same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mha.bench.framework import models, options, report
from mha.bench.framework.contenders import Contenders
from mha.bench.framework.inprocess import make_session
from mha.bench.framework.report import Row, ratio, target, value
from mha.bench.framework.rounds import run_rounds
from mha.bench.framework.sequences import (
    DTYPE,
    Measured,
    SequencePlan,
    Served,
    agreement,
    run_pair_scenario,
    run_sequences,
)
from mha.bench.scenarios.decode import floor, mixed
from mha.client import SequenceStep
from mha.contract import QUERY
from mha.service.core import decoding

# cached-frontends-N: the cached decode through `mha serve --frontends N` (mha.service.frontends)
FRONTENDS = ("cached-frontends-1", "cached-frontends-2", "cached-frontends-default")
CONTENDERS = ("cached", "recompute", "batching-off", "echo", "in-process", *FRONTENDS)
SERVED = {  # server config -> contenders
    "on": ("cached", "recompute"), "off": ("batching-off",),
    **{name.removeprefix("cached-"): (name,) for name in FRONTENDS},
}  # fmt: skip
CACHE_VS_RECOMPUTE = 20.0  # cached tokens/s over recompute's, at the longest prompt
BATCHING_ON_VS_OFF = 0.97  # batching on's tokens/s over off's, every point: never slower
P99_ON_OVER_OFF = 1.1  # and its step p99 over off's
HELD_OVER_ROWS = 1.1  # the server's cache bytes over the rows' bytes (the paged cache)
MB = 1e6


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


@dataclass(frozen=True)
class Workload:
    """`sequences` sequences at once, each a prompt of P tokens then `steps` steps of one."""

    prompt: int
    steps: int
    sequences: int

    @property
    def label(self) -> str:
        return f"P={self.prompt} x{self.sequences}"

    def tokens(self, width: int, seed: int) -> list[np.ndarray]:
        """Each sequence's tokens [1, P + steps, E], seeded by (seed, P, index): sequence i
        of a prompt length is the same for every contender, so answers can be compared."""
        shape = (1, self.prompt + self.steps, width)
        return [
            np.random.default_rng((seed, self.prompt, i)).standard_normal(shape).astype(DTYPE)
            for i in range(self.sequences)
        ]

    def plans(self, cached: bool, width: int, seed: int, tag: str) -> list[SequencePlan]:
        """cached: the prompt once, then one token per step (the server holds K/V);
        recompute: step k sends the whole prefix [1, P + k, E] and keeps the last row."""
        found, p, n = [], self.prompt, self.steps
        for i, t in enumerate(self.tokens(width, seed)):
            sequence = f"{tag}-{i}"
            if cached:
                start = ({QUERY: t[:, :p]}, SequenceStep(sequence, start=True))
                steps = [
                    ({QUERY: t[:, p + k - 1 : p + k]}, SequenceStep(sequence))
                    for k in range(1, n + 1)
                ]
                found.append(SequencePlan(start, steps))
            else:
                found.append(
                    SequencePlan(None, [({QUERY: t[:, : p + k]}, None) for k in range(1, n + 1)])
                )
        return found


FLAGS: tuple[options.Flag, ...] = (
    ("--quick", dict(action="store_true", help="tiny sizes (d_model 64, P 8, 4 steps, 1 and 4 "
                     "sequences; for tests)")),
    ("--prompts", dict(type=options.whole_numbers,
                       help="comma-separated prompt lengths P (default 128,1024)")),
    ("--steps", dict(type=int, help="steps of one token after the prompt (default 64)")),
    ("--sequences", dict(type=options.whole_numbers,
                         help="comma-separated sequences at once (default 1,8,32)")),
    ("--recompute-sequences", dict(type=options.whole_numbers,
                                   help="the same for recompute (default 1)")),
    ("--contestants", dict(help=f"comma-separated subset of {', '.join(CONTENDERS)} "
                           f"(default: all but {', '.join(FRONTENDS)})")),
    ("--d-model", dict(type=int, help="model width (default 512)")),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_sized_arguments(parser, FLAGS, Path("bench-out/decode"))


def in_process(session: Any, workload: Workload, width: int, seed: int) -> Measured:
    """One sequence through the step graph in this process, its cache in two numpy buffers
    (filled rows handed to ONNX Runtime as views, the step's new rows appended)."""
    [tokens] = Workload(workload.prompt, workload.steps, 1).tokens(width, seed)
    keys = np.empty((1, workload.prompt + workload.steps, width), DTYPE)
    values = np.empty_like(keys)

    def step(length: int, new: int) -> tuple[np.ndarray, float]:
        began = time.perf_counter()
        feeds = decoding.step_inputs(
            tokens[:, length : length + new], keys[:, :length], values[:, :length]
        )
        output, new_key, new_value = session.run(list(decoding.STEP_OUTPUTS), feeds)
        keys[:, length : length + new], values[:, length : length + new] = new_key, new_value
        return output[0, -1], time.perf_counter() - began

    row, prefill = step(0, workload.prompt)
    started, seconds = time.perf_counter(), []
    for k in range(workload.steps):
        row, took = step(workload.prompt + k, 1)
        seconds.append(took)
    return Measured(seconds, time.perf_counter() - started, [prefill], row)


def measure(
    args: argparse.Namespace,
    sizes: Sizes,
    pair: models.Pair,
    wanted: tuple[str, ...],
    contenders: Contenders,
) -> dict[str, Any]:
    """Start the servers, warm every contender up, run the rounds; the document's figures."""
    width, seed = sizes.d_model, args.seed
    runners: dict[str, Callable[[Workload, str], Measured]] = {}
    places: dict[str, str | None] = {}
    hows: dict[str, Served] = {}
    if "in-process" in wanted:
        session = make_session(pair.dir(0) / "model.onnx", args.threads)
        in_process(session, Workload(min(sizes.prompts), 2, 1), width, seed)  # warm-up
        runners["in-process"] = lambda w, _tag: in_process(session, w, width, seed)
        places["in-process"] = None
    for config, names in SERVED.items():
        for name in (n for n in names if n in wanted):
            server = contenders.started.get(config) or contenders.serve(
                config, pair.repository, config
            )
            runners[name], hows[name] = served(server.url, name, pair, server.metrics, sizes, seed)
            places[name] = config
    if "echo" in wanted:
        echo = contenders.echo(pair.dir(0))
        runners["echo"], _ = served(echo.url, "echo", pair, lambda: None, sizes, seed)
        places["echo"] = "echo"
    counts = {"recompute": sizes.recompute_sequences, "in-process": (1,)}
    runs, order = run_rounds(
        runners,
        lambda name: [
            Workload(p, sizes.steps, n)
            for p in sizes.prompts
            for n in counts.get(name, sizes.sequences)
        ],
        sizes.repeats,
        lambda name, w, r: f"{name}-{w.prompt}-{w.sequences}-{r}",
    )
    records, rows = [], {}
    for (name, workload), measured in runs.items():
        pooled = Measured.pooled(measured)
        records.append(record(name, places[name], workload, pooled, width))
        rows[name, workload.prompt] = pooled.first_row
        report.say(line(records[-1]))
    decoding = Workload(min(sizes.prompts), sizes.steps, mixed.MIXED_SEQUENCES)
    stepping: dict[str, Served] = {n: hows[n] for n in ("cached", "batching-off") if n in hows}
    return {
        "servers": {c: s.record() for c, s in contenders.started.items()},
        "points": sorted(records, key=lambda r: list(runners).index(r["contestant"])),
        "mixed": mixed.measure(stepping, decoding, max(sizes.prompts), width, seed, sizes.repeats),
        "agreement": agreement(rows, ("prompt",), skip=("echo",)),
        "order": [{"contestant": n, "workload": w.label, "repeat": r} for r, n, w in order],
    }


def served(
    url: str,
    name: str,
    pair: models.Pair,
    metrics: Callable[[], str | None],
    sizes: Sizes,
    seed: int,
) -> tuple[Callable[[Workload, str], Measured], Served]:
    cached = name != "recompute"
    how = Served(url, pair.names[0 if cached else 1], cached and name != "echo", metrics)
    warm_up = Workload(min(sizes.prompts), 2, max(sizes.sequences))
    run_sequences(how, warm_up.plans(cached, sizes.d_model, seed, f"{name}-warm-up"))
    return lambda w, tag: run_sequences(how, w.plans(cached, sizes.d_model, seed, tag)), how


def record(
    name: str, server: str | None, workload: Workload, measured: Measured, width: int
) -> Row:
    """One point of bench.json."""
    held = name not in ("recompute", "echo")  # what the cache rows of every sequence take
    context = workload.prompt + workload.steps
    found = {
        "contestant": name,
        "server": server,
        "prompt": workload.prompt,
        "steps": workload.steps,
        "sequences": workload.sequences,
        **measured.record(),
        "prefill_p50_ms": float(np.median(measured.first_s)) * 1e3 if name != "recompute" else None,
        "cache_rows_bytes": 2 * width * 4 * context * workload.sequences if held else None,
    }
    if name == "echo":
        found["cache_bytes"] = None
    return found


def line(r: Row) -> str:
    refused = f"  {r['refused']} refusals sent again" if r["refused"] else ""
    return (
        f"{r['contestant']:<12} P={r['prompt']} x{r['sequences']:<6} {r['tokens_per_s']:9.1f} "
        f"tokens/s  step p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms{refused}"
    )


def run(args: argparse.Namespace) -> int:
    wanted = options.chosen(args.contestants, CONTENDERS, "--contestants")
    if not args.contestants:  # the frontends' contenders when asked for by name
        wanted = tuple(c for c in wanted if c not in FRONTENDS)
    document, sizes, pair = run_pair_scenario(
        args, models.DECODE_PAIR, QUICK if args.quick else FULL,
        lambda sizes, pair, contenders: measure(args, sizes, pair, wanted, contenders),
    )  # fmt: skip
    names = {"repository": str(pair.repository), "kv": pair.names[0], "full": pair.names[1]}
    document["models"] = names
    document["targets"] = print_tables(document)
    title = f"mha bench decode (d_model {sizes.d_model}, {sizes.steps} steps)"
    panels = (
        ("tokens_per_s", "decoded tokens/s (all sequences)", None),
        ("p50_ms", "step ms", "p99_ms"),
    )
    plot = (
        None
        if args.no_plot
        else lambda path: report.lines_plot(
            "decode",
            document["points"],
            "prompt",
            "context length at the first step (prompt P)",
            panels,
            path,
            title,
        )
    )
    report.write(args.out, document, plot=plot)
    return 0


FIGURES: tuple[report.Column, ...] = (
    ("contestant", "contestant"), ("server", lambda r: r["server"] or "-"), ("P", "prompt"),
    ("sequences", "sequences"), ("steps", "steps"), ("tokens/s", "tokens_per_s"),
    ("step p50 ms", "p50_ms"), ("step p99 ms", "p99_ms"), ("prefill p50 ms", "prefill_p50_ms"),
    ("mean batch", "mean_batch"), ("cache MB (server)", report.scaled("cache_bytes", MB)),
    ("cache MB (rows)", report.scaled("cache_rows_bytes", MB)),
)  # fmt: skip
WORKLOAD = report.workload_columns(("P", "prompt"), ("sequences", "sequences"))
RECOMPUTE: tuple[report.Column, ...] = (
    *WORKLOAD, *report.paired("cached", "recompute", "tokens_per_s", "tokens/s"),
    report.ratio_column("cached/recompute", "tokens_per_s"),
    *report.paired("cached", "recompute", "p50_ms", "p50 ms"),
)  # fmt: skip
BATCHING: tuple[report.Column, ...] = (
    *WORKLOAD, *report.paired("on", "off", "tokens_per_s", "tokens/s"),
    report.ratio_column("on/off", "tokens_per_s"), *report.paired("on", "off", "p99_ms", "p99 ms"),
    ("on mean batch", lambda v: value(v["top"], "mean_batch")),
)  # fmt: skip


def print_tables(document: Row) -> list[Row]:
    """Print every table; return the targets."""
    points = document["points"]
    print(report.load_heading("decode figures", document["machine"]))
    print(report.columns_table(points, FIGURES))
    recompute = report.versus(points, "cached", "recompute", ("prompt", "sequences"))
    print("\nKV cache vs recompute\n" + report.columns_table(recompute, RECOMPUTE))
    longest = max((r["prompt"] for r in points), default=0)
    targets = [target(f"P={longest} x{v['bottom']['sequences']}: cached tokens/s >= "
                      f"{CACHE_VS_RECOMPUTE:g}x recompute",
                      ratio(v["top"], v["bottom"], "tokens_per_s"), CACHE_VS_RECOMPUTE, True)
               for v in recompute if v["bottom"]["prompt"] == longest]  # fmt: skip
    batching = report.versus(points, "cached", "batching-off", ("prompt", "sequences"))
    print("\ncontinuous batching on vs off\n" + report.columns_table(batching, BATCHING))
    for v in batching:
        at = f"P={v['bottom']['prompt']} x{v['bottom']['sequences']}"
        targets += [
            target(f"{at}: batching on tokens/s >= {BATCHING_ON_VS_OFF:g}x off",
                   ratio(v["top"], v["bottom"], "tokens_per_s"), BATCHING_ON_VS_OFF, True),
            target(f"{at}: batching on step p99 <= {P99_ON_OVER_OFF:g}x off",
                   ratio(v["top"], v["bottom"], "p99_ms"), P99_ON_OVER_OFF, False),
        ]  # fmt: skip
    targets += [target(f"{r['contestant']} P={r['prompt']} x{r['sequences']}: cache bytes <= "
                       f"{HELD_OVER_ROWS:g}x the rows' bytes",
                       r["cache_bytes"] / r["cache_rows_bytes"] if r.get("cache_bytes") else None,
                       HELD_OVER_ROWS, False)
                for r in points if r["contestant"] == "cached"]  # fmt: skip
    targets += mixed.print_table(document.get("mixed", []))
    text, found = floor.served_vs_floor(points)
    print("\ngRPC step vs the protocol floor and the in-process ceiling\n" + text)
    agreement = (
        ("P", "prompt"),
        ("contestants", "pair"),
        ("max abs diff, sequence 0's last output row", "max_abs_diff"),
    )
    print("\nsame answers\n" + report.columns_table(document["agreement"], agreement))
    print("\ntargets\n" + report.targets_table(targets + found))
    return targets + found
