"""Tables, targets and the figure of `mha bench memory`.

Records are plain dicts (what bench.json holds): contestant, memory (S), steps, sequences,
tokens, seconds, tokens_per_s, p50_ms, p90_ms, p99_ms, max_ms, first_step_p50_ms,
request_bytes_per_step (mean over a sequence's steps), request_bytes_first,
request_bytes_later, mean_batch, padding_fraction, cache_bytes (reserved on the server,
read from /metrics while the sequences were live) and memory_rows_bytes (2 * E * 4 bytes
per memory token held). Every comparison is a ratio of two contestants of the same run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from mha.bench.decode_report import ratio, value
from mha.bench.report import Row, find, target
from mha.tables import markdown_table as table

CACHED_VS_RESEND = 5.0  # cached tokens/s over resend's, at the longest memory, most sequences
AGREEMENT = 1e-4  # max |diff| of two fp32 exports of the same weights (parity is 1e-5 each)
KB = 1e3


def figures_table(records: Sequence[Row]) -> str:
    """Every measured point, one row each."""
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
        for r in records
    ]
    headers = ["contestant", "S", "sequences", "steps", "tokens/s", "step p50 ms",
               "step p99 ms", "first step p50 ms", "request kB/step", "mean batch",
               "memory kB (server)"]  # fmt: skip
    return table(headers, rows)


def cached_vs_resend(records: Sequence[Row]) -> tuple[str, list[Row]]:
    """Cached vs resend per point; the target at the longest memory with the most sequences."""
    rows, targets = [], []
    longest = max((r["memory"] for r in records), default=0)
    most = max((r["sequences"] for r in records), default=0)
    for resend in (r for r in records if r["contestant"] == "resend"):
        where = {"memory": resend["memory"], "sequences": resend["sequences"]}
        cached = find(records, contestant="cached", **where)
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
    headers = ["S", "sequences", "cached tokens/s", "resend tokens/s", "cached/resend",
               "cached p50 ms", "resend p50 ms", "cached bytes/step", "resend bytes/step",
               "resend/cached bytes"]  # fmt: skip
    return table(headers, rows), targets


def agreement_table(agreement: Sequence[Row]) -> tuple[str, list[Row]]:
    """Max |diff| per workload, and the target over all of them."""
    rows = [[a["memory"], a["sequences"], a["pair"], a["max_abs_diff"]] for a in agreement]
    worst = max((a["max_abs_diff"] for a in agreement), default=float("nan"))
    check = target(f"answers agree: max abs diff <= {AGREEMENT:g}", worst, AGREEMENT, False)
    headers = ["S", "sequences", "contestants", "max abs diff, sequence 0's last output row"]
    return table(headers, rows), [check]


def write_plot(records: Sequence[Row], path: Path, title: str) -> None:
    """Tokens/s and step p50 vs memory length S, one line per (contestant, sequences)."""
    from mha.client.plot import PlotUnavailable, pyplot

    try:
        plt = pyplot()
    except PlotUnavailable as err:
        print(f"mha bench memory: no plot: {err}", file=sys.stderr)
        return
    lines: dict[str, list[Row]] = {}
    for r in sorted(records, key=lambda r: r["memory"]):
        lines.setdefault(f"{r['contestant']} x{r['sequences']}", []).append(r)
    memories = sorted({r["memory"] for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, ylabel in zip(
        axes, ("tokens_per_s", "p50_ms"), ("tokens/s (all sequences)", "step p50 ms"), strict=True
    ):
        for label, line in lines.items():
            ax.plot([r["memory"] for r in line], [r[key] for r in line], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(memories, [str(s) for s in memories])
        ax.set_xlabel("memory tokens S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
