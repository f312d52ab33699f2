"""What a burst or a random run tells: refusals classified, targets, `mha bench flood` tables.

A refusal is any answer but OK. It is retryable with a reason when its code is UNAVAILABLE,
RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED and its details say something beyond what the gRPC
library writes by itself ("CANCELLED", "Deadline Exceeded", "Socket closed", ...): a client
can back off and knows why. Targets print PASS, MISS, or n/a when nothing measured them.

Each refusal also has a source, from its details: "HTTP/2" when the stream was reset
("Stream removed", "RST_STREAM ... error code 7" = REFUSED_STREAM, GOAWAY), "gRPC" for the
library's own words (its concurrent-RPC limit, "Deadline Exceeded", ...), "server" for
mha's. HTTP/2 resets and gRPC's concurrent-RPC limit come before the handler: the server's
/metrics never see those requests (mha.bench.framework.probes).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mha.bench.framework.report import Column, Row, columns_table, percentile_ms, table, target
from mha.bench.framework.unary import Answer
from mha.tables import cell

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
HTTP2_MARKERS = ("RST_STREAM", "Stream removed", "GOAWAY", "REFUSED_STREAM")
GRPC_LIMIT = "Concurrent RPC limit exceeded"  # grpc's server, past maximum_concurrent_rpcs
SOURCES = ("server", "gRPC", "HTTP/2")
DETAILS_CHARS = 110
DETAILS_SHOWN = 5  # distinct details per code


def has_reason(details: str) -> bool:
    """Whether details carry the server's reason, not only gRPC's own words."""
    text = details.strip()
    return text not in LIBRARY_DETAILS and not text.startswith(LIBRARY_PREFIXES)


def source(details: str) -> str:
    """Who wrote a refusal's details: "HTTP/2", "gRPC" or "server" (see the module's doc)."""
    text = details.strip()
    if any(marker in text for marker in HTTP2_MARKERS):
        return "HTTP/2"
    return "gRPC" if GRPC_LIMIT in text or not has_reason(text) else "server"


def before_handler(details: str) -> bool:
    """Whether the transport refused the call before mha's handler could see it."""
    return source(details) == "HTTP/2" or GRPC_LIMIT in details


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
        "sources": {k: n for k in SOURCES if (n := sum(source(a.details) == k for a in refused))},
        "before_handler": dict(
            sorted(Counter(source(a.details) for a in refused if before_handler(a.details)).items())
        ),
    }


def by_kind(answers: Sequence[Answer]) -> dict[str, dict[str, int]]:
    """kind -> code -> count (the random run)."""
    found: dict[str, Counter] = {}
    for a in answers:
        found.setdefault(a.kind, Counter())[a.code] += 1
    return {kind: dict(sorted(c.items())) for kind, c in sorted(found.items())}


def check(phase: str, name: str, measured: Any, bound: Any, ok: bool | None) -> Row:
    """A target of one phase."""
    return target(name, measured, bound, ok=ok, phase=phase)


def probe_ok(record: Row) -> Row:
    return check(
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
        check(
            phase,
            "every answer OK or retryable (UNAVAILABLE, RESOURCE_EXHAUSTED, "
            "DEADLINE_EXCEEDED) with its reason in details",
            s["unfit"],
            0,
            s["unfit"] == 0,
        ),
        check(phase, "zero CANCELLED, INTERNAL, UNKNOWN", s["forbidden"], 0, s["forbidden"] == 0),
    ]
    p99 = s["refused_p99_ms"]
    found.append(
        check(
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
    found.append(check(phase, "accepted p99 <= max queue delay + 2 run times", accepted, bound, ok))
    found.append(probe_ok(record))
    return found


def random_targets(record: Row, max_growth: float) -> list[Row]:
    phase, s = record["name"], record["summary"]
    bad = sum(s["codes"].get(c, 0) for c in NEVER_FOR_GARBAGE)
    found = [check(phase, "zero INTERNAL, UNKNOWN", bad, 0, bad == 0)]
    warm, quiet = record["rss_mb"]["warm"], record["rss_mb"]["quiet"]
    bound = warm * (1 + max_growth) if warm is not None else None
    ok = None if bound is None or quiet is None else quiet <= bound
    name = f"VmRSS after the quiet period within {max_growth:.0%} of after warm-up (MB)"
    found.append(check(phase, name, quiet, bound, ok))
    found.append(probe_ok(record))
    return found


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in codes.items()) or "-"


BURSTS: tuple[Column, ...] = (
    ("phase", "name"), ("requests", lambda b: b["summary"]["requests"]), ("(B,L)", "shape"),
    ("wall s", "wall_s"), ("answers", lambda b: _codes(b["summary"]["codes"])),
    *((f"{side} {q} ms", lambda b, k=f"{side}_{q}_ms": b["summary"][k])
      for side in ("accepted", "refused") for q in ("p50", "p99")),
    ("server run ms", lambda b: b["server"].get("run_ms")),
    ("mean batch", lambda b: b["server"].get("mean_batch")),
    ("VmRSS MB before", lambda b: b["rss_mb"]["before"]),
    ("VmRSS MB after", lambda b: b["rss_mb"]["after"]),
    ("good request after", lambda b: _probe(b["probe"])),
)  # fmt: skip


def bursts_table(bursts: Sequence[Row]) -> str:
    return columns_table(bursts, BURSTS)


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
                rows.append([r["name"], code, n, source(text), text or "(empty)"])
            if len(seen) > DETAILS_SHOWN:
                rest = sum(n for _, n in seen[DETAILS_SHOWN:])
                more = {source(text) for text, _ in seen[DETAILS_SHOWN:]}
                rows.append([r["name"], code, rest, "/".join(sorted(more)),
                             f"({len(seen) - DETAILS_SHOWN} more)"])  # fmt: skip
    headers = ["phase", "code", "count", "source", "details"]
    return table(headers, rows) if rows else "(no refusals)"


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


def breakdown(record: Row) -> Row:
    """Client p99 against the server's, for accepted and refused requests; their difference
    estimates the share of the wire and the client (the transfer, the event loop). Only an
    estimate: quantiles do not subtract, and the server's figure is a bucket's upper bound
    (None, "coarse", when that bound is above the client's p99: the bucket says nothing)."""
    s, view = record["summary"], record.get("server_view")
    scope = None if view is None else "by outcome" if view["by_outcome"] else "all outcomes"
    found: Row = {"server_scope": scope}
    for side in ("accepted", "refused"):
        client, server = s[f"{side}_p99_ms"], _server_p99(view, side)
        rest, coarse = None, False
        if client is not None and server is not None:
            coarse = not math.isfinite(server) or server > client
            rest = None if coarse else client - server
        found[side] = {"client_p99_ms": client, "server_p99_le_ms": server,
                       "wire_client_ms": rest, "coarse": coarse}  # fmt: skip
    return found


def _server_p99(view: Row | None, side: str) -> float | None:
    if view is None:
        return None
    figures = view[side] if view["by_outcome"] else view["requests"].get("all")
    return None if not figures else figures["p99_le_ms"]


def _le(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"<= {ms:g}" if math.isfinite(ms) else "> last bucket"


def transfer_table(bursts: Sequence[Row]) -> str:
    """Per burst: what went over the one connection, and the client's p99 against the
    server's (an estimate of the wire's and the client's share)."""
    headers = ["phase", "wall s", "sent MB", "MB/s", "accepted p99 ms: client", "server",
               "wire + client", "refused p99 ms: client", "server", "wire + client",
               "refused before the handler"]  # fmt: skip
    rows = []
    for b in bursts:
        sent, split = b["sent"], b["breakdown"]
        row = [b["name"], b["wall_s"], sent["bytes"] / 1e6, sent["mb_per_s"]]
        every = " (all outcomes)" if split["server_scope"] == "all outcomes" else ""
        for side in ("accepted", "refused"):
            part = split[side]
            if part["client_p99_ms"] is None:  # none of that side on the client
                row += [None, "-", None]
            else:
                server = _le(part["server_p99_le_ms"])
                rest = "- (bucket too coarse)" if part["coarse"] else part["wire_client_ms"]
                row += [part["client_p99_ms"], server + every * (server != "-"), rest]
        rows.append([*row, _codes(b["summary"]["before_handler"])])
    return table(headers, rows)


def server_table(bursts: Sequence[Row]) -> str:
    """Per burst, from the delta of the server's /metrics histograms: request durations
    (handler start -> answer) by outcome, the queue time of accepted requests, the runs."""
    rows: list[list[Any]] = []
    for b in bursts:
        view, name = b.get("server_view"), b["name"]
        if view is None:
            rows.append([name, "(no /metrics)", "-", None, "-", "-"])
            continue
        for outcome, f in view["requests"].items():
            if outcome == "all":
                outcome = "all: " + _codes(view["outcomes"])
            rows.append([name, "request", outcome, f["count"], f["p50"], f["p99"]])
        if view["by_outcome"] and len(view["requests"]) > 1:
            f = view["refused"]
            rows.append([name, "request", "every refusal", f["count"], f["p50"], f["p99"]])
        for key, what in (("queue", "queue (accepted)"), ("compute", "session run")):
            f = view[key]
            rows.append([name, what, "-", f["count"], f["p50"], f["p99"]])
    return table(["phase", "measure", "outcome", "count", "p50", "p99"], rows)


def bounds_line(bursts: Sequence[Row]) -> str:
    views = [b["server_view"] for b in bursts if b.get("server_view")]
    if not views:
        return "no /metrics: the server side is n/a (--metrics-url)"
    bounds = ", ".join(f"{ms:g}" for ms in views[0]["bucket_bounds_ms"])
    return (
        f"quantiles are the upper bound of the bucket holding them; bucket bounds (ms): "
        f"{bounds}, +Inf. Requests refused before the handler are not in these counts."
    )


def server_sentence(record: Row) -> str:
    """One sentence: the server's p99 against the client's, and what the rest is."""
    view, split, name = record.get("server_view"), record["breakdown"], record["name"]
    if view is None:
        return f"{name}: server side n/a (no /metrics)"
    if view["by_outcome"]:
        refused = view["refused"]
        said = (
            f"refusals answered in {refused['p99']} (p99) after the handler started"
            if refused["count"]
            else "no refusal reached the handler"
        )
        said += f"; accepted {view['accepted']['p99']}"
    else:
        every = view["requests"].get("all")
        said = (
            f"every outcome together ({_codes(view['outcomes'])}; the request histogram has "
            f"no outcome label) answered in {every['p99'] if every else '-'} (p99) after the "
            "handler started"
        )
    client = ", ".join(
        f"{cell(split[side]['client_p99_ms'])} ms {side}"
        for side in ("refused", "accepted")
        if split[side]["client_p99_ms"] is not None
    )
    mb = cell(record["sent"]["bytes"] / 1e6)
    text = (
        f"{name} server side: {said}; client side p99 {client or '-'}: the rest is the "
        f"transfer of {mb} MB on one connection and the wait for the event loop"
    )
    s = record["summary"]
    if s["before_handler"]:
        text += (
            f"; {sum(s['before_handler'].values())} refusals came from the transport "
            f"({_codes(s['before_handler'])}) and never reached the handler"
        )
    return text + "."
