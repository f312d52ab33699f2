"""Figures, targets and tables of `mha bench flood` (records are the plain dicts of the JSON).

A refusal is any answer but OK. It is retryable with a reason when its code is UNAVAILABLE,
RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED and its details say something beyond what the gRPC
library writes by itself ("CANCELLED", "Deadline Exceeded", "Socket closed", ...): a client
can back off and knows why. Targets print PASS, MISS, or n/a when nothing measured them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from mha.bench.flood_load import Answer
from mha.tables import cell
from mha.tables import markdown_table as table

Row = dict[str, Any]
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
FORBIDDEN = ("CANCELLED", "INTERNAL", "UNKNOWN")
NEVER_FOR_GARBAGE = ("INTERNAL", "UNKNOWN")
LIBRARY_DETAILS = (
    "",
    "CANCELLED",
    "Cancelled",
    "Deadline Exceeded",
    "Socket closed",
    "Connection reset by peer",
    "Broken pipe",
)
LIBRARY_PREFIXES = ("failed to connect", "Received RST_STREAM", "Stream removed", "GOAWAY")
DETAILS_CHARS = 110
DETAILS_SHOWN = 5  # distinct details per code


def has_reason(details: str) -> bool:
    """Whether details carry the server's reason, not only gRPC's own words."""
    text = details.strip()
    return text not in LIBRARY_DETAILS and not text.startswith(LIBRARY_PREFIXES)


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    finite = [s for s in seconds if math.isfinite(s)]
    return float(np.percentile(finite, q) * 1e3) if finite else None


def trimmed(details: str) -> str:
    text = " ".join(details.split())
    return text if len(text) <= DETAILS_CHARS else text[: DETAILS_CHARS - 3] + "..."


def template(details: str) -> str:
    """Details with every number as N: one row for "raw contents are 6017020 bytes" and kin."""
    return re.sub(r"\d+", "N", details)


def summarize(answers: Sequence[Answer]) -> Row:
    """Counts by code, the distinct details of each refusal code (one example of each
    template, commonest first), and the latencies of accepted and refused requests."""
    codes = Counter(a.code for a in answers)
    details: dict[str, list[list[Any]]] = {}
    for code in sorted(c for c in codes if c != "OK"):
        seen: Counter = Counter()
        example: dict[str, str] = {}
        for a in answers:
            if a.code == code:
                text = trimmed(a.details)
                seen[template(text)] += 1
                example.setdefault(template(text), text)
        details[code] = [[example[key], n] for key, n in seen.most_common()]
    ok = [a.seconds for a in answers if a.code == "OK"]
    refused = [a for a in answers if a.code != "OK"]
    return {
        "requests": len(answers),
        "codes": dict(sorted(codes.items())),
        "details": details,
        "accepted_p50_ms": percentile_ms(ok, 50),
        "accepted_p99_ms": percentile_ms(ok, 99),
        "refused_p50_ms": percentile_ms([a.seconds for a in refused], 50),
        "refused_p99_ms": percentile_ms([a.seconds for a in refused], 99),
        "not_retryable": sum(a.code not in RETRYABLE for a in refused),
        "without_reason": sum(not has_reason(a.details) for a in refused),
        "unfit": sum(a.code not in RETRYABLE or not has_reason(a.details) for a in refused),
        "forbidden": sum(codes[c] for c in FORBIDDEN),
    }


def by_kind(answers: Sequence[Answer]) -> dict[str, dict[str, int]]:
    """kind -> code -> count (the random run)."""
    found: dict[str, Counter] = {}
    for a in answers:
        found.setdefault(a.kind, Counter())[a.code] += 1
    return {kind: dict(sorted(c.items())) for kind, c in sorted(found.items())}


def target(phase: str, name: str, value: Any, bound: Any, ok: bool | None) -> Row:
    return {"phase": phase, "target": name, "value": value, "bound": bound, "ok": ok}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def probe_ok(record: Row) -> Row:
    return target(
        record["name"],
        "a good request succeeds after",
        record["probe"]["code"],
        "OK",
        record["probe"]["code"] == "OK",
    )


def burst_targets(record: Row, max_queue_delay_ms: float) -> list[Row]:
    """The burst's targets: how it refused, how fast, how long the accepted ones took."""
    phase, s = record["name"], record["summary"]
    refused = s["requests"] - s["codes"].get("OK", 0)
    found = [
        target(
            phase,
            "every answer OK or retryable (UNAVAILABLE, RESOURCE_EXHAUSTED, "
            "DEADLINE_EXCEEDED) with its reason in details",
            s["unfit"],
            0,
            s["unfit"] == 0,
        ),
        target(phase, "zero CANCELLED, INTERNAL, UNKNOWN", s["forbidden"], 0, s["forbidden"] == 0),
    ]
    p99 = s["refused_p99_ms"]
    found.append(
        target(
            phase,
            "refusals p99 < 50 ms",
            p99,
            50.0,
            None if not refused or p99 is None else p99 < 50.0,
        )
    )
    run_ms = record["server"].get("run_ms")
    bound = None
    if max_queue_delay_ms > 0 and run_ms is not None:
        bound = max_queue_delay_ms + 2 * run_ms
    accepted = s["accepted_p99_ms"]
    ok = None if bound is None or accepted is None else accepted <= bound
    found.append(
        target(phase, "accepted p99 <= max queue delay + 2 run times", accepted, bound, ok)
    )
    found.append(probe_ok(record))
    return found


def random_targets(record: Row, max_growth: float) -> list[Row]:
    phase, s = record["name"], record["summary"]
    bad = sum(s["codes"].get(c, 0) for c in NEVER_FOR_GARBAGE)
    found = [target(phase, "zero INTERNAL, UNKNOWN", bad, 0, bad == 0)]
    warm, quiet = record["rss_mb"]["warm"], record["rss_mb"]["quiet"]
    bound = warm * (1 + max_growth) if warm is not None else None
    ok = None if bound is None or quiet is None else quiet <= bound
    name = f"VmRSS after the quiet period within {max_growth:.0%} of after warm-up (MB)"
    found.append(target(phase, name, quiet, bound, ok))
    found.append(probe_ok(record))
    return found


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in codes.items()) or "-"


def bursts_table(bursts: Sequence[Row]) -> str:
    headers = [
        "phase",
        "requests",
        "(B,L)",
        "wall s",
        "answers",
        "accepted p50 ms",
        "accepted p99 ms",
        "refused p50 ms",
        "refused p99 ms",
        "server run ms",
        "mean batch",
        "VmRSS MB before",
        "VmRSS MB after",
        "good request after",
    ]
    rows = []
    for b in bursts:
        s, server = b["summary"], b["server"]
        rows.append(
            [
                b["name"],
                s["requests"],
                b["shape"],
                b["wall_s"],
                _codes(s["codes"]),
                s["accepted_p50_ms"],
                s["accepted_p99_ms"],
                s["refused_p50_ms"],
                s["refused_p99_ms"],
                server.get("run_ms"),
                server.get("mean_batch"),
                b["rss_mb"]["before"],
                b["rss_mb"]["after"],
                _probe(b["probe"]),
            ]
        )
    return table(headers, rows)


def _probe(probe: Row) -> str:
    ms = probe["ms"]
    return f"{probe['code']} ({ms:.1f} ms)" if ms is not None else probe["code"]


def details_table(records: Sequence[Row]) -> str:
    """The distinct details of every refusal code, per phase: an example of each template
    (numbers aside), the commonest first."""
    rows = []
    for r in records:
        for code, seen in r["summary"]["details"].items():
            for text, n in seen[:DETAILS_SHOWN]:
                rows.append([r["name"], code, n, text or "(empty)"])
            if len(seen) > DETAILS_SHOWN:
                rest = sum(n for _, n in seen[DETAILS_SHOWN:])
                rows.append([r["name"], code, rest, f"({len(seen) - DETAILS_SHOWN} more)"])
    return table(["phase", "code", "count", "details"], rows) if rows else "(no refusals)"


def kinds_table(kinds: dict[str, dict[str, int]]) -> str:
    codes = sorted({c for seen in kinds.values() for c in seen}, key=lambda c: (c != "OK", c))
    rows = [[k, sum(seen.values()), *(seen.get(c, 0) for c in codes)] for k, seen in kinds.items()]
    return table(["kind", "sent", *codes], rows)


def memory_table(record: Row) -> str:
    rss = record["rss_mb"]
    rows = [
        ["after warm-up", rss["warm"]],
        ["after the run", rss["after"]],
        [f"after {record['quiet_s']:g} s quiet", rss["quiet"]],
    ]
    return table(["server", "VmRSS MB"], rows)


def targets_table(targets: Sequence[Row]) -> str:
    rows = [[t["phase"], t["target"], t["value"], t["bound"], verdict(t["ok"])] for t in targets]
    return table(["phase", "target", "measured", "bound", "verdict"], rows)


def verdict_lines(targets: Sequence[Row]) -> str:
    """One line per target: PASS/MISS/n/a, phase, target, measured vs bound."""
    return "\n".join(
        f"{verdict(t['ok']):<4}  {t['phase']}: {t['target']} "
        f"(measured {cell(t['value'])}, bound {cell(t['bound'])})"
        for t in targets
    )
