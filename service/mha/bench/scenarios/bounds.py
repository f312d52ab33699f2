"""The tables and targets of `mha bench serve`: against in-process, batching, the bound.

Points are plain dicts (what the JSON holds): config, workload, concurrency, rate, merge,
rps, p50_ms, p90_ms, p99_ms, max_ms, requests, errors, and for served runs mean_batch and
padding_fraction. Targets: end-to-end latency and throughput against the in-process baseline,
batching on vs off against the floor+compute bound, and (goal_targets, the PASS/MISS lines)
--no-compute against the bare echo server, the full server against the bound
1 / (1/echo + 1/in-process), and batching never below --no-batching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mha.bench.framework.report import Row, find, table, target, value
from mha.bench.scenarios.points import Goals

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


def latency_report(
    points: Sequence[Row], workloads: Sequence[str], servers: Sequence[str] = ("on", "off")
) -> tuple[str, list[Row]]:
    """Latency at c=1, throughput at c=1,4,16, and their targets vs in-process."""
    rows = []
    for w in workloads:
        for config in ("on", "off", "floor", "echo", "inprocess", "external"):
            one = find(points, config=config, workload=w, concurrency=1, merge=1)
            if one is not None:
                rates = [value(find(points, config=config, workload=w, concurrency=c, merge=1),
                              "rps") for c in (1, 4, 16)]  # fmt: skip
                rows.append([w, config, value(one, "p50_ms"), value(one, "p99_ms"), *rates])
    headers = ["(B,L)", "config", "p50 ms c=1", "p99 ms c=1", "req/s c=1", "req/s c=4",
               "req/s c=16"]  # fmt: skip
    local = find(points, config="inprocess", workload="1x128", concurrency=1, merge=1)
    singles = [p for p in points if p.get("merge", 1) == 1]
    targets = []
    for server in servers:
        served = find(points, config=server, workload="1x128", concurrency=1, merge=1)
        limit = value(local, "p50_ms") + 1.3
        name = f"(1,128) p50 c=1 {server} <= in-process p50 + 1.3 ms"
        targets.append(target(name, value(served, "p50_ms"), limit, False))
        for w, share in (("1x128", 0.55), ("1x16", 0.25)):
            rps = value(find(points, config=server, workload=w, concurrency=16, merge=1), "rps")
            best = inprocess_best(singles, w)
            where = f"c={best['concurrency']}" if best else "-"
            targets.append(target(f"({w.replace('x', ',')}) req/s c=16 {server} >= {share:.0%} "
                                  f"of in-process (its best, {where})", rps,
                                  share * value(best, "rps"), True))  # fmt: skip
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
            value(on, "rps"), value(off, "rps"), value(on, "p99_ms"), value(off, "p99_ms"),
        )  # fmt: skip
        bound = 1 / (1 / value(floor, "rps") + 1 / value(local, "rps"))
        best = max(on_rps, off_rps)
        how = f"c={local['concurrency']} x{local['merge']}" if local else None
        rows.append([w, on_rps, off_rps, on_rps / off_rps, on_p99, off_p99,
                     value(on, "padding_fraction"), value(on, "mean_batch"), value(floor, "rps"),
                     value(local, "rps"), how, bound, best / bound])  # fmt: skip
        targets += [
            target(f"{w}: req/s on >= 1.0x off", on_rps, off_rps, True),
            target(f"{w}: p99 on <= 1.1x p99 off", on_p99, 1.1 * off_p99, False),
            target(f"{w}: best server >= 90% of floor+compute bound", best, 0.9 * bound, True),
        ]
        if "-" in w:  # the length mix
            pad = value(on, "padding_fraction")
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
        "floor+compute bound",
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


# The targets against the echo server and the bound (plan.Goals says where they apply).
FLOOR_SHARE = 0.95  # --no-compute req/s >= this share of the echo's, at bound_clients
FLOOR_P50_MS = 0.1  # --no-compute p50 at one client <= the echo's + this
BOUND_SHARE = 0.90  # the full server's req/s >= this share of the bound, at bound_clients
SERVER_P50_MS = 0.15  # its p50 at one client <= the echo's + in-process p50 + this


def bound(echo_rps: float, inprocess_rps: float) -> float:
    """1 / (1/echo + 1/in-process): a server that pays the echo's gRPC cost and then the
    compute, one after the other, per request. NaN if either is missing or not positive."""
    if not (echo_rps > 0 and inprocess_rps > 0):  # NaN fails both comparisons
        return math.nan
    return 1 / (1 / echo_rps + 1 / inprocess_rps)


def closed(points: Sequence[Row], config: str, workload: str, clients: int) -> Row | None:
    """The closed-loop point of a configuration (single requests, no open-loop rate)."""
    return find(points, config=config, workload=workload, concurrency=clients, merge=1, rate=0)


def _figure(points: Sequence[Row], config: str, w: str, clients: int, key: str) -> float:
    return value(closed(points, config, w, clients), key)


def shape_bound(points: Sequence[Row], workload: str, clients: int) -> float:
    """The bound of one shape, from the echo's and in-process req/s at `clients`."""
    return bound(
        _figure(points, "echo", workload, clients, "rps"),
        _figure(points, "inprocess", workload, clients, "rps"),
    )


def _shape(workload: str) -> str:
    return "(" + workload.replace("x", ",", 1) + ")"  # 1x16-256 -> (1,16-256)


def floor_targets(points: Sequence[Row], workload: str, clients: int) -> list[Row]:
    """--no-compute vs echo: req/s at `clients`, p50 at one client."""
    rps, echo_rps = (_figure(points, c, workload, clients, "rps") for c in ("floor", "echo"))
    p50, echo_p50 = (_figure(points, c, workload, 1, "p50_ms") for c in ("floor", "echo"))
    w = _shape(workload)
    return [
        target(f"no-compute {w} req/s c={clients} >= {FLOOR_SHARE:.0%} of echo", rps,
               FLOOR_SHARE * echo_rps, True),
        target(f"no-compute {w} p50 ms c=1 <= echo + {FLOOR_P50_MS:g} ms", p50,
               echo_p50 + FLOOR_P50_MS, False),
    ]  # fmt: skip


def server_targets(points: Sequence[Row], workload: str, clients: int) -> list[Row]:
    """The full server (batching on) vs the bound at `clients`, and its p50 at one client."""
    rps, p50 = (
        _figure(points, "on", workload, clients, "rps"),
        _figure(points, "on", workload, 1, "p50_ms"),
    )
    floor_p50 = sum(_figure(points, c, workload, 1, "p50_ms") for c in ("echo", "inprocess"))
    w = _shape(workload)
    return [
        target(f"server {w} req/s c={clients} >= {BOUND_SHARE:.0%} of bound", rps,
               BOUND_SHARE * shape_bound(points, workload, clients), True),
        target(f"server {w} p50 ms c=1 <= echo + in-process + {SERVER_P50_MS:g} ms", p50,
               floor_p50 + SERVER_P50_MS, False),
    ]  # fmt: skip


def batching_targets(points: Sequence[Row], workload: str, clients: int) -> list[Row]:
    """Batching on never below --no-batching: req/s and p99 at `clients`."""
    on, off = closed(points, "on", workload, clients), closed(points, "off", workload, clients)
    w = _shape(workload)
    return [
        target(f"batching {w} req/s c={clients} on >= off", value(on, "rps"), value(off, "rps"),
               True),
        target(f"batching {w} p99 ms c={clients} on <= off", value(on, "p99_ms"),
               value(off, "p99_ms"), False),
    ]  # fmt: skip


def goal_targets(points: Sequence[Row], goals: Goals) -> list[Row]:
    """Every PASS/MISS target of the goals, in the order they are printed."""
    found = [t for w in goals.floor_shapes for t in floor_targets(points, w, goals.bound_clients)]
    found += [
        t for w in goals.server_shapes for t in server_targets(points, w, goals.bound_clients)
    ]
    for w in goals.batching_shapes:
        found += [t for c in goals.batching_clients for t in batching_targets(points, w, c)]
    return found


CONTENDERS = ("echo", "inprocess", "floor", "on", "off", "external")
OF_ECHO, OF_BOUND = {"floor", "on", "off", "external"}, {"on", "off", "external"}


def _share(part: float, whole: float) -> str:
    """value / whole as a percentage; "-" when either is missing."""
    ratio = part / whole if whole > 0 else math.nan
    return "-" if math.isnan(ratio) else f"{ratio:.0%}"


def _bound_rows(points: Sequence[Row], w: str, clients: int) -> list[list[Any]]:
    echo_rps, echo_p50 = (
        _figure(points, "echo", w, clients, "rps"),
        _figure(points, "echo", w, 1, "p50_ms"),
    )
    limit = shape_bound(points, w, clients)
    rows = []
    for config in CONTENDERS:
        if closed(points, config, w, clients) is None and closed(points, config, w, 1) is None:
            continue
        rps, p50 = (
            _figure(points, config, w, clients, "rps"),
            _figure(points, config, w, 1, "p50_ms"),
        )
        rows.append([w, config, rps, _share(rps, echo_rps) if config in OF_ECHO else "",
                     _share(rps, limit) if config in OF_BOUND else "", p50,
                     p50 - echo_p50 if config in OF_ECHO else ""])  # fmt: skip
        if config == "inprocess":  # the bound beside its two terms
            rows.append([w, "bound", limit, _share(limit, echo_rps), "", echo_p50 + p50, ""])
    return rows


def bound_table(points: Sequence[Row], workloads: Sequence[str], clients: int) -> str:
    """Per shape: req/s at `clients` as a share of the echo's and of the bound, p50 at c=1.

    The "bound" row: req/s the bound, p50 the echo's plus in-process.
    """
    headers = ["(B,L)", "config", f"req/s c={clients}", "% of echo", "% of bound",
               "p50 ms c=1", "p50 - echo p50 ms"]  # fmt: skip
    return table(headers, [r for w in workloads for r in _bound_rows(points, w, clients)])


def bounds(points: Sequence[Row], workloads: Sequence[str], clients: int) -> dict[str, Row]:
    """The JSON record of the bound per shape: its inputs and its value."""
    return {
        w: {
            "clients": clients,
            "echo_rps": _figure(points, "echo", w, clients, "rps"),
            "inprocess_rps": _figure(points, "inprocess", w, clients, "rps"),
            "bound_rps": shape_bound(points, w, clients),
        }
        for w in workloads
    }
