"""Tables and target checks for `mha bench serve` results.

Points are plain dicts (what the JSON holds): config, workload, concurrency, rate, merge,
rps, p50_ms, p90_ms, p99_ms, max_ms, requests, errors, and for served runs mean_batch and
padding_fraction. Targets: end-to-end latency and throughput against the in-process baseline, and
batching on vs off against the compute bound.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mha.tables import markdown_table as table

Row = dict[str, Any]


def find(points: Sequence[Row], **where: Any) -> Row | None:
    """The first point matching every field given."""
    return next((p for p in points if all(p.get(k) == v for k, v in where.items())), None)


def _get(point: Row | None, key: str) -> float:
    return float(point[key]) if point is not None and point.get(key) is not None else math.nan


POINT_COLUMNS = (
    ("requests", "requests"), ("rps", "req/s"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
    ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("mean_batch", "mean batch"),
    ("padding_fraction", "padding"), ("client_cpu_ms", "client CPU ms/req"),
)  # fmt: skip


def points_table(points: Sequence[Row]) -> str:
    """Every measured point, one row each."""
    rows = []
    for p in points:
        load = f"rate {p['rate']:g}/s" if p["rate"] else f"c={p['concurrency']}"
        if p.get("merge", 1) > 1:
            load += f" x{p['merge']}"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(p["errors"].items())) or "0"
        values = [p.get(key) for key, _ in POINT_COLUMNS]
        rows.append([p["config"], p["workload"], load, *values, errors])
    headers = ["config", "workload", "load", *(title for _, title in POINT_COLUMNS), "errors"]
    return table(headers, rows)


def inprocess_best(points: Sequence[Row], workload: str) -> Row | None:
    """The in-process point with the highest request rate on a workload."""
    candidates = [p for p in points if p["config"] == "inprocess" and p["workload"] == workload]
    return max(candidates, key=lambda p: p["rps"], default=None)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _check(value: float, bound: float, higher_is_better: bool) -> bool | None:
    if math.isnan(value) or math.isnan(bound):
        return None
    return value >= bound if higher_is_better else value <= bound


def target(name: str, value: float, bound: float, higher_is_better: bool) -> Row:
    """One target check: the measured value against its bound."""
    return {"target": name, "value": value, "bound": bound,
            "ok": _check(value, bound, higher_is_better)}  # fmt: skip


def latency_report(
    points: Sequence[Row], workloads: Sequence[str], servers: Sequence[str] = ("on", "off")
) -> tuple[str, list[Row]]:
    """Latency at c=1, throughput at c=1,4,16, and their targets vs in-process."""
    rows = []
    for w in workloads:
        for config in ("on", "off", "floor", "inprocess", "external"):
            one = find(points, config=config, workload=w, concurrency=1, merge=1)
            if one is not None:
                rates = [_get(find(points, config=config, workload=w, concurrency=c, merge=1),
                              "rps") for c in (1, 4, 16)]  # fmt: skip
                rows.append([w, config, _get(one, "p50_ms"), _get(one, "p99_ms"), *rates])
    headers = ["(B,L)", "config", "p50 ms c=1", "p99 ms c=1", "req/s c=1", "req/s c=4",
               "req/s c=16"]  # fmt: skip
    local = find(points, config="inprocess", workload="1x128", concurrency=1, merge=1)
    singles = [p for p in points if p.get("merge", 1) == 1]
    targets = []
    for server in servers:
        served = find(points, config=server, workload="1x128", concurrency=1, merge=1)
        limit = _get(local, "p50_ms") + 1.3
        name = f"(1,128) p50 c=1 {server} <= in-process p50 + 1.3 ms"
        targets.append(target(name, _get(served, "p50_ms"), limit, False))
        for w, share in (("1x128", 0.55), ("1x16", 0.25)):
            rps = _get(find(points, config=server, workload=w, concurrency=16, merge=1), "rps")
            best = inprocess_best(singles, w)
            where = f"c={best['concurrency']}" if best else "-"
            targets.append(target(f"({w.replace('x', ',')}) req/s c=16 {server} >= {share:.0%} "
                                  f"of in-process (its best, {where})", rps,
                                  share * _get(best, "rps"), True))  # fmt: skip
    return table(headers, rows), targets


def batching_report(
    points: Sequence[Row], workloads: Sequence[str], concurrency: int = 32
) -> tuple[str, list[Row]]:
    """Batching on vs off at 32 clients, and the floor/compute bound."""
    rows, targets = [], []
    for w in workloads:
        on = find(points, config="on", workload=w, concurrency=concurrency)
        off = find(points, config="off", workload=w, concurrency=concurrency)
        floor = find(points, config="floor", workload=w, concurrency=concurrency)
        local = inprocess_best(points, w)
        if on is None and off is None:
            continue
        on_rps, off_rps, on_p99, off_p99 = (
            _get(on, "rps"), _get(off, "rps"), _get(on, "p99_ms"), _get(off, "p99_ms"),
        )  # fmt: skip
        bound = 1 / (1 / _get(floor, "rps") + 1 / _get(local, "rps"))
        best = max(on_rps, off_rps)
        how = f"c={local['concurrency']} x{local['merge']}" if local else None
        rows.append([w, on_rps, off_rps, on_rps / off_rps, on_p99, off_p99,
                     _get(on, "padding_fraction"), _get(on, "mean_batch"), _get(floor, "rps"),
                     _get(local, "rps"), how, bound, best / bound])  # fmt: skip
        targets += [
            target(f"{w}: req/s on >= 1.0x off", on_rps, off_rps, True),
            target(f"{w}: p99 on <= 1.1x p99 off", on_p99, 1.1 * off_p99, False),
            target(f"{w}: best server >= 90% of bound", best, 0.9 * bound, True),
        ]
        if "-" in w:  # the length mix
            pad = _get(on, "padding_fraction")
            targets.append(target(f"{w}: padded-token fraction (on) <= 25%", pad, 0.25, False))
    headers = [
        "workload",
        "on req/s",
        "off req/s",
        "on/off",
        "on p99 ms",
        "off p99 ms",
        "padding",
        "mean batch",
        "floor req/s",
        "in-proc req/s",
        "in-proc best",
        "bound",
        "best/bound",
    ]
    return table(headers, rows), targets


def servers_table(servers: dict[str, Row]) -> tuple[str, list[Row]]:
    """Start-up time and resident memory per server configuration, with their targets."""
    rows = [[c, s["startup_s"], s.get("rss_idle_mb"), s["rss_mb"], s.get("model", "")]
            for c, s in servers.items()]  # fmt: skip
    targets = []
    on = servers.get("on")
    if on is not None:
        targets += [
            target("start to SERVING < 2 s (on)", on["startup_s"], 2.0, False),
            target("VmRSS after the run < 200 MB (on)", on["rss_mb"], 200.0, False),
        ]
    headers = ["server", "start to SERVING s", "VmRSS MB when ready", "VmRSS MB after run",
               "model"]  # fmt: skip
    return table(headers, rows), targets


def targets_table(targets: Sequence[Row]) -> str:
    return table(
        ["target", "measured", "bound", "verdict"],
        [[t["target"], t["value"], t["bound"], verdict(t["ok"])] for t in targets],
    )


def load_heading(title: str, machine: Row) -> str:
    """A table's heading with the machine's load average before and after the run."""
    return (
        f"\n{title} (load average before {machine['loadavg_before'][0]:.2f}, after "
        f"{machine['loadavg_after'][0]:.2f}; {machine['cpus']} CPUs, shared machine)"
    )


def write_json(path: Path, document: Row) -> None:
    """Strict JSON (NaN and infinities as null) of a benchmark's document."""
    path.write_text(json.dumps(finite_json(document), indent=1, allow_nan=False))


def finite_json(value: Any) -> Any:
    """The document with NaN and infinities as None, so strict JSON can hold it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value
