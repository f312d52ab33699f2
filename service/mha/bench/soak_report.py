"""Figures, verdict and tables of `mha bench soak` (intervals are the plain dicts of the JSON).

The verdict fails when any request failed (a soak at moderate load should see no refusal
at all) or when the server's VmRSS grew by more than the bound after the warm-up (from a
few samples at its start to a few at the end: rss_growth). The p99 drift (last interval
against the first after the warm-up) is reported, not judged: one busy spell of a shared
machine moves it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from mha.bench.soak_load import Interval
from mha.tables import markdown_table as table

Row = dict[str, Any]
MAX_ROWS_PRINTED = 30  # of the RSS-over-time table; bench.md has every row
WINDOW = 3  # samples at least whose median is each end of the VmRSS growth


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    return float(np.percentile(seconds, q) * 1e3) if len(seconds) else None


def interval_record(interval: Interval, warmup_s: float) -> Row:
    return {
        "start_s": interval.start_s,
        "end_s": interval.end_s,
        "warmup": interval.start_s < warmup_s,  # begun during the warm-up
        "rss_mb": interval.rss_mb,
        "requests": len(interval.latencies) + sum(interval.failures.values()),
        "p50_ms": percentile_ms(interval.latencies, 50),
        "p99_ms": percentile_ms(interval.latencies, 99),
        "failures": dict(interval.failures),
    }


def kinds_record(intervals: Sequence[Interval], warmup_s: float) -> dict[str, Row]:
    """Per workload kind, after the warm-up (the whole run if it ended first): answers OK,
    p50, p99."""
    seconds: dict[str, list[float]] = {}
    judged = [i for i in intervals if i.start_s >= warmup_s] or intervals
    for interval in judged:
        for kind, took in zip(interval.kinds, interval.latencies, strict=True):
            seconds.setdefault(kind, []).append(took)
    return {
        kind: {"ok": len(s), "p50_ms": percentile_ms(s, 50), "p99_ms": percentile_ms(s, 99)}
        for kind, s in sorted(seconds.items())
    }


def failure_details(intervals: Sequence[Interval]) -> dict[str, int]:
    seen: Counter = Counter()
    for interval in intervals:
        seen.update(interval.details)
    return dict(seen.most_common())


def rss_growth(records: Sequence[Row]) -> Row:
    """VmRSS at the start and at the end of the judged part of the run, and how it was read.

    The judged part is every sample after the warm-up. VmRSS swings by a tenth between two
    samples of a busy server (buffers come and go), so with 6 samples or more each end is
    the median of a tenth of them (WINDOW at least); a leak moves the medians too.
    """
    sampled = [r for r in records if r["rss_mb"] is not None]
    after = [r for r in sampled if not r["warmup"]]
    note = "after the warm-up"
    if len(after) < 2:
        after, note = sampled, "the run ended before two samples after the warm-up: every sample"
    if len(after) < 2:
        return {"baseline_mb": None, "last_mb": None, "growth": None, "note": "too few samples"}
    window = max(WINDOW, len(after) // 10) if len(after) >= 2 * WINDOW else 1
    values = [r["rss_mb"] for r in after]
    baseline, last = float(np.median(values[:window])), float(np.median(values[-window:]))
    how = f"median of the first and of the last {window} samples" if window > 1 else "first, last"
    return {
        "baseline_mb": baseline,
        "last_mb": last,
        "growth": last / baseline - 1,
        "note": f"{note}; {how}",
    }


def p99_drift(records: Sequence[Row]) -> Row:
    """p99 of the last interval with answers against the first one after the warm-up."""
    measured = [r for r in records if r["p99_ms"] is not None]
    after = [r for r in measured if not r["warmup"]] or measured
    if not after:
        return {"first_ms": None, "last_ms": None, "ratio": None}
    first, last = after[0]["p99_ms"], after[-1]["p99_ms"]
    return {"first_ms": first, "last_ms": last, "ratio": last / first if first else None}


def verdict(records: Sequence[Row], max_growth: float) -> Row:
    """ok, and why not: any failed request, or VmRSS growth over max_growth."""
    failures = sum(sum(r["failures"].values()) for r in records)
    growth = rss_growth(records)
    reasons = []
    if failures:
        reasons.append(f"{failures} requests failed")
    if growth["growth"] is not None and growth["growth"] > max_growth:
        reasons.append(
            f"VmRSS grew {growth['growth']:.1%} after the warm-up (bound {max_growth:.0%})"
        )
    return {
        "ok": not reasons,
        "reasons": reasons,
        "failures": failures,
        "rss": growth,
        "max_growth": max_growth,
    }


def rss_table(records: Sequence[Row], max_rows: int | None = None) -> str:
    """VmRSS and latency per interval; at most max_rows, evenly spaced, the ends kept."""
    shown = list(range(len(records)))
    if max_rows is not None and len(records) > max_rows:
        shown = sorted({round(i * (len(records) - 1) / (max_rows - 1)) for i in range(max_rows)})
    rows = []
    for i in shown:
        r = records[i]
        failed = ", ".join(f"{c} {n}" for c, n in r["failures"].items()) or "0"
        rows.append(
            [
                f"{r['start_s']:.0f}-{r['end_s']:.0f}",
                "yes" if r["warmup"] else "",
                r["rss_mb"],
                r["requests"],
                r["p50_ms"],
                r["p99_ms"],
                failed,
            ]
        )
    headers = ["seconds", "warm-up", "VmRSS MB", "requests", "p50 ms", "p99 ms", "failed"]
    return table(headers, rows)


def kinds_table(kinds: dict[str, Row]) -> str:
    rows = [[k, v["ok"], v["p50_ms"], v["p99_ms"]] for k, v in kinds.items()]
    return table(["workload", "answers OK", "p50 ms", "p99 ms"], rows)


def summary_table(document: Row) -> str:
    v, drift = document["verdict"], document["p99_drift"]
    growth = v["rss"]["growth"]
    rows = [
        ["VmRSS after warm-up MB", v["rss"]["baseline_mb"]],
        ["VmRSS at the end MB", v["rss"]["last_mb"]],
        ["VmRSS read as", v["rss"]["note"]],
        [
            "VmRSS growth",
            f"{growth:+.1%} (bound {v['max_growth']:.0%})" if growth is not None else "-",
        ],
        ["p99 first interval after warm-up ms", drift["first_ms"]],
        ["p99 last interval ms", drift["last_ms"]],
        ["p99 drift (last / first)", drift["ratio"]],
        ["requests failed", v["failures"]],
        ["verdict", "PASS" if v["ok"] else "FAIL: " + "; ".join(v["reasons"])],
    ]
    return table(["soak", "value"], rows)
