"""Tables, targets and the figure of `mha bench decode`.

Records are plain dicts (what bench.json holds): contestant, server, prompt, steps,
sequences, tokens, seconds, tokens_per_s, p50_ms, p90_ms, p99_ms, max_ms, prefill_p50_ms,
mean_batch, padding_fraction, cache_bytes (reserved on the server, read from /metrics while
the sequences were live) and cache_rows_bytes (2 * E * 4 bytes per token held). Every
comparison is a ratio of two contestants measured in the same run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mha.bench.report import Row, find, target
from mha.tables import markdown_table as table

CACHE_VS_RECOMPUTE = 10.0  # cached tokens/s over recompute's, at the longest prompt
BATCHING_ON_VS_OFF = 2.0  # continuous batching's tokens/s over batching off's, most sequences
STEP_OVER_FLOOR_MS = 0.15  # serving's targets, for a step: p50 over echo + in-process
SHARE_OF_BOUND = 0.9  # and tokens/s against the bound of the two
MB = 1e6


def value(record: Row | None, key: str) -> float:
    """A record's figure, NaN when the record or the figure is missing."""
    found = None if record is None else record.get(key)
    return math.nan if found is None else float(found)


def ratio(top: Row | None, bottom: Row | None, key: str) -> float:
    under = value(bottom, key)
    return value(top, key) / under if under else math.nan


def _megabytes(record: Row, key: str) -> float | None:
    return None if record.get(key) is None else record[key] / MB


def figures_table(records: Sequence[Row]) -> str:
    """Every measured point, one row each."""
    rows = [
        [
            r["contestant"],
            r["server"] or "-",
            r["prompt"],
            r["sequences"],
            r["steps"],
            r["tokens_per_s"],
            r["p50_ms"],
            r["p99_ms"],
            r["prefill_p50_ms"],
            r["mean_batch"],
            _megabytes(r, "cache_bytes"),
            _megabytes(r, "cache_rows_bytes"),
        ]
        for r in records
    ]
    headers = [
        "contestant",
        "server",
        "P",
        "sequences",
        "steps",
        "tokens/s",
        "step p50 ms",
        "step p99 ms",
        "prefill p50 ms",
        "mean batch",
        "cache MB (server)",
        "cache MB (rows)",
    ]
    return table(headers, rows)


def prompts_of(records: Sequence[Row]) -> list[int]:
    return sorted({r["prompt"] for r in records})


def cache_vs_recompute(records: Sequence[Row]) -> tuple[str, list[Row]]:
    """Cached vs recompute per prompt and sequence count; the target at the longest prompt."""
    rows, targets = [], []
    longest = max(prompts_of(records), default=0)
    for r in (r for r in records if r["contestant"] == "recompute"):
        cached = find(records, contestant="cached", prompt=r["prompt"], sequences=r["sequences"])
        times = ratio(cached, r, "tokens_per_s")
        rows.append(
            [
                r["prompt"],
                r["sequences"],
                value(cached, "tokens_per_s"),
                r["tokens_per_s"],
                times,
                value(cached, "p50_ms"),
                r["p50_ms"],
            ]
        )
        if r["prompt"] == longest:
            name = (
                f"P={longest} x{r['sequences']}: cached tokens/s >= "
                f"{CACHE_VS_RECOMPUTE:g}x recompute"
            )
            targets.append(target(name, times, CACHE_VS_RECOMPUTE, True))
    headers = [
        "P",
        "sequences",
        "cached tokens/s",
        "recompute tokens/s",
        "cached/recompute",
        "cached p50 ms",
        "recompute p50 ms",
    ]
    return table(headers, rows), targets


def batching_on_vs_off(records: Sequence[Row]) -> tuple[str, list[Row]]:
    """Continuous batching vs batching off per point; the target at the most sequences."""
    rows, targets = [], []
    most = max((r["sequences"] for r in records if r["contestant"] == "batching-off"), default=0)
    for off in (r for r in records if r["contestant"] == "batching-off"):
        on = find(records, contestant="cached", prompt=off["prompt"], sequences=off["sequences"])
        times = ratio(on, off, "tokens_per_s")
        rows.append(
            [
                off["prompt"],
                off["sequences"],
                value(on, "tokens_per_s"),
                off["tokens_per_s"],
                times,
                value(on, "p99_ms"),
                off["p99_ms"],
                value(on, "mean_batch"),
            ]
        )
        if off["sequences"] == most:
            name = (
                f"P={off['prompt']} x{most}: batching on tokens/s >= "
                f"{BATCHING_ON_VS_OFF:g}x batching off"
            )
            targets.append(target(name, times, BATCHING_ON_VS_OFF, True))
    headers = [
        "P",
        "sequences",
        "on tokens/s",
        "off tokens/s",
        "on/off",
        "on p99 ms",
        "off p99 ms",
        "on mean batch",
    ]
    return table(headers, rows), targets


def served_vs_floor(records: Sequence[Row]) -> tuple[str, list[Row]]:
    """The cached step over gRPC against the protocol's floor (the echo's step) and the
    in-process ceiling, with serving's targets (`mha bench serve`) where both were measured.

    bound = 1 / (1/echo tokens/s + 1/in-process tokens/s): the protocol and the step's
    compute one after the other on the same cores (the in-process step of one sequence, the
    echo's at the point's sequences). Over = cached p50 - echo p50 - in-process p50, at one
    sequence (with more, a step's latency includes the other sequences' turns).
    """
    rows, targets = [], []
    for cached in (r for r in records if r["contestant"] == "cached"):
        prompt, sequences = cached["prompt"], cached["sequences"]
        echo = find(records, contestant="echo", prompt=prompt, sequences=sequences)
        local = find(records, contestant="in-process", prompt=prompt, sequences=1)
        if echo is None and local is None:
            continue
        rate, echo_rate, local_rate = (value(r, "tokens_per_s") for r in (cached, echo, local))
        bound = 1 / (1 / echo_rate + 1 / local_rate)
        over = cached["p50_ms"] - value(echo, "p50_ms") - value(local, "p50_ms")
        rows.append(
            [
                prompt, sequences, value(echo, "p50_ms"), value(local, "p50_ms"),
                cached["p50_ms"], over if sequences == 1 else None,
                ratio(cached, local, "p50_ms") if sequences == 1 else None,
                echo_rate, local_rate, bound, rate, rate / bound,
            ]
        )  # fmt: skip
        if echo is None or local is None:
            continue
        label = f"P={prompt} x{sequences}"
        if sequences == 1:
            name = f"{label}: step p50 <= echo + in-process + {STEP_OVER_FLOOR_MS:g} ms"
            targets.append(target(name, over, STEP_OVER_FLOOR_MS, False))
        name = f"{label}: tokens/s >= {SHARE_OF_BOUND:.0%} of bound"
        targets.append(target(name, rate / bound, SHARE_OF_BOUND, True))
    headers = [
        "P", "sequences", "echo p50 ms", "in-process p50 ms", "gRPC p50 ms",
        "over echo + in-process ms", "gRPC/in-process p50", "echo tokens/s",
        "in-process tokens/s", "bound tokens/s", "gRPC tokens/s", "of bound",
    ]  # fmt: skip
    return table(headers, rows), targets


def agreement_table(agreement: Sequence[Row]) -> str:
    rows = [[a["prompt"], a["pair"], a["max_abs_diff"]] for a in agreement]
    return table(["P", "contestants", "max abs diff, sequence 0's last output row"], rows)


def write_plot(records: Sequence[Row], path: Path, title: str) -> None:
    """Tokens/s and step latency (p50 solid, p99 dashed) vs prompt length, per contestant."""
    from mha.client.plot import PlotUnavailable, pyplot

    try:
        plt = pyplot()
    except PlotUnavailable as err:
        print(f"mha bench decode: no plot: {err}", file=sys.stderr)
        return
    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    for label, line in _lines(records).items():
        prompts = [r["prompt"] for r in line]
        drawn = rate_ax.plot(prompts, [r["tokens_per_s"] for r in line], "o-", label=label)
        color = drawn[0].get_color()
        latency_ax.plot(
            prompts, [r["p50_ms"] for r in line], "o-", color=color, label=f"{label} p50"
        )
        latency_ax.plot(
            prompts, [r["p99_ms"] for r in line], "x--", color=color, label=f"{label} p99"
        )
    for ax, ylabel in ((rate_ax, "decoded tokens/s (all sequences)"), (latency_ax, "step ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(prompts_of(records), [str(p) for p in prompts_of(records)])
        ax.set_xlabel("context length at the first step (prompt P)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lines(records: Sequence[Row]) -> dict[str, list[Any]]:
    """One line per (contestant, sequences), its points by prompt length."""
    lines: dict[str, list[Any]] = {}
    for r in sorted(records, key=lambda r: r["prompt"]):
        lines.setdefault(f"{r['contestant']} x{r['sequences']}", []).append(r)
    return lines
