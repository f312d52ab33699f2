"""`mha bench serve --preset frontends`'s table: one process against frontends before an engine.

Side by side at 16 clients: `mha serve --frontends 1` (one process does everything),
`--frontends 2`, and the default for this machine's CPUs; the bound of N frontends is
1 / (1/echo_N + 1/in-process) with N echo processes on one port (`echo-2`). Targets
(docs/performance.md, "Frontends"): the default >= 1.25x one process at (1,16) and >= 80%
of its bound; never below 0.97x at (8,128) and the length mix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mha.bench.framework.report import Row, table, target, value
from mha.bench.scenarios.bounds import bound, closed
from mha.bench.scenarios.points import FRONTENDS

CLIENTS = FRONTENDS.concurrency[0]
SHAPES = FRONTENDS.workloads
SERVED = ("frontends-1", "frontends-2", "frontends-default")
SMALL_GAIN = 1.25  # the default over one process at (1,16)
OF_BOUND = 0.8  # ... and its share of the bound with as many echo processes
NEVER_SLOWER = 0.97  # the default over one process, every other shape


def _rps(points: Sequence[Row], config: str, workload: str) -> float:
    return value(closed(points, config, workload, CLIENTS), "rps")


def _echo_of(config: str, frontends: int | None) -> str:
    """The echo with as many processes as the config has frontends (echo-2 for 2)."""
    count = {"frontends-1": 1, "frontends-2": 2}.get(config, frontends or 1)
    return "echo" if count == 1 else f"echo-{count}"


def _ratio(top: float, bottom: float) -> str:
    return "-" if not bottom or math.isnan(top / bottom) else f"{top / bottom:.2f}x"


def report(points: Sequence[Row], default_frontends: int | None) -> tuple[str, list[Row]]:
    """The table (req/s, x one process, % of the bound) and the targets."""
    rows, found = [], []
    for w in SHAPES:
        one = _rps(points, "frontends-1", w)
        for config in SERVED:
            rps = _rps(points, config, w)
            if math.isnan(rps):
                continue
            limit = bound(_rps(points, _echo_of(config, default_frontends), w),
                          _rps(points, "inprocess", w))  # fmt: skip
            share = "-" if math.isnan(limit) else f"{rps / limit:.0%}"
            rows.append([w, config, rps, _ratio(rps, one), limit, share])
        rps = _rps(points, "frontends-default", w)
        if w == "1x16":
            echo = _echo_of("frontends-default", default_frontends)
            limit = bound(_rps(points, echo, w), _rps(points, "inprocess", w))
            found.append(target(f"(1,16) c=16 default / one process >= {SMALL_GAIN}",
                                rps / one if one else math.nan, SMALL_GAIN, True))  # fmt: skip
            found.append(target(f"(1,16) c=16 default >= {OF_BOUND:.0%} of the bound with {echo}",
                                rps / limit if limit else math.nan, OF_BOUND, True))  # fmt: skip
        else:
            found.append(target(f"({w.replace('x', ',')}) c=16 default / one process >= "
                                f"{NEVER_SLOWER}", rps / one if one else math.nan,
                                NEVER_SLOWER, True))  # fmt: skip
    headers = ["(B,L)", "config", f"req/s c={CLIENTS}", "x frontends-1", "bound req/s",
               "% of bound"]  # fmt: skip
    return table(headers, rows), found
