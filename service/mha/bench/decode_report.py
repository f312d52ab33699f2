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


def served_vs_in_process(records: Sequence[Row]) -> str:
    """One sequence's step over gRPC as a multiple of the in-process step (no target)."""
    rows = []
    for local in (r for r in records if r["contestant"] == "in-process"):
        served = find(records, contestant="cached", prompt=local["prompt"], sequences=1)
        rows.append(
            [
                local["prompt"],
                local["p50_ms"],
                value(served, "p50_ms"),
                ratio(served, local, "p50_ms"),
                local["tokens_per_s"],
                value(served, "tokens_per_s"),
                ratio(local, served, "tokens_per_s"),
            ]
        )
    headers = [
        "P",
        "in-process p50 ms",
        "gRPC p50 ms",
        "gRPC/in-process p50",
        "in-process tokens/s",
        "gRPC tokens/s",
        "in-process/gRPC tokens/s",
    ]
    return table(headers, rows)


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
