"""Probes: the server's /metrics read while a benchmark runs, and what two reads tell apart.

Totals: the sum and count of a histogram (padding, batch sizes, session runs) and gauges
(the sequence cache's bytes), so a point's mean batch is samples / runs between two reads.
The server's view of a spell of load: the delta of its histograms between two scrapes. The
server observes a request from the moment its handler started (the whole message received
and parsed) until the answer; the wire, the client's event loop and the time a body waited
behind others on one HTTP/2 connection are outside it. Buckets are cumulative counts, so
the delta of two scrapes is the histogram of what happened in between; a quantile is
reported as the upper bound of the bucket that holds it ("<= X ms"), because the buckets
are all the server keeps (mha.service.core.metrics: 0.1 ms to 10 s). Requests refused by
the transport (HTTP/2 REFUSED_STREAM, gRPC's own concurrent-RPC limit) never reach the
handler and are in none of these counts. Resident memory is a probe too
(mha.bench.framework.contenders.rss_mb).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

REQUEST = "mha_request_duration_seconds"  # handler start -> answer, every request
QUEUE = "mha_queue_duration_seconds"  # submit -> session run start, accepted requests
COMPUTE = "mha_compute_duration_seconds"  # one session run (a batch counts once)
BATCH = "mha_batch_size_samples"
PADDING = "mha_batch_padding_fraction"
REQUESTS = "mha_requests_total"  # requests finished, by outcome
CACHE_BYTES = re.compile(r"^mha_sequence_cache_bytes (\S+)$", re.MULTILINE)
SUCCESS = "success"
ALL = "all"  # the group of a histogram without the label asked for
QUANTILES = {"p50": 0.50, "p99": 0.99}

Buckets = dict[float, float]  # upper bound, s (math.inf for +Inf) -> cumulative count
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str, model: str) -> Iterable[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` whose model label is `model`."""
    for found, labels, value in _SAMPLE.findall(text):
        if found == name:
            pairs = dict(_LABEL.findall(labels))
            if pairs.get("model") == model:
                yield pairs, float(value)


def histogram_totals(text: str, name: str, model: str) -> tuple[float, float]:
    """(sum, count) of a histogram over every version of `model`."""
    total_sum = sum(v for _, v in samples(text, name + "_sum", model))
    return total_sum, sum(v for _, v in samples(text, name + "_count", model))


def totals(text: str | None, model: str) -> dict[str, float]:
    """What the points' deltas are made of: samples and session runs, padding, compute
    seconds, and the sequence cache's bytes (a gauge: its value, not a delta)."""
    if text is None:
        return {}
    samples_sum, runs = histogram_totals(text, BATCH, model)
    pad_sum, pad_count = histogram_totals(text, PADDING, model)
    compute_s, _ = histogram_totals(text, COMPUTE, model)
    cache = CACHE_BYTES.search(text)
    return {
        "samples": samples_sum,
        "runs": runs,
        "pad_sum": pad_sum,
        "pad_count": pad_count,
        "compute_s": compute_s,
        "cache_bytes": float(cache[1]) if cache else math.nan,
    }


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean batch, mean padded fraction and mean run time between two reads of totals."""

    def delta(key: str) -> float | None:
        return after[key] - before[key] if key in before and key in after else None

    runs, samples_n, pad_sum, pad_count = (
        delta(k) for k in ("runs", "samples", "pad_sum", "pad_count")
    )
    compute = delta("compute_s")
    return {
        "runs": runs,
        "mean_batch": samples_n / runs if runs and samples_n is not None else None,
        # mean over session runs of each run's padded-token fraction
        "padding_fraction": pad_sum / pad_count if pad_count and pad_sum is not None else None,
        "run_ms": 1e3 * compute / runs if runs and compute is not None else None,
    }


def histogram(text: str, name: str, model: str, by: str | None = None) -> dict[str, Buckets]:
    """Cumulative bucket counts of histogram `name` for `model`, summed over its versions and
    grouped by label `by` (one group, ALL, when there is no such label)."""
    found: dict[str, Buckets] = {}
    for labels, value in samples(text, name + "_bucket", model):
        group = labels.get(by, ALL) if by else ALL
        bound = float(labels["le"])  # "+Inf" parses as inf
        buckets = found.setdefault(group, {})
        buckets[bound] = buckets.get(bound, 0.0) + value
    return found


def counter(text: str, name: str, model: str, by: str) -> dict[str, float]:
    """A counter of `model` by label `by`, summed over its versions."""
    found: dict[str, float] = {}
    for labels, value in samples(text, name, model):
        found[labels.get(by, ALL)] = found.get(labels.get(by, ALL), 0.0) + value
    return found


def delta(before: dict[str, Buckets], after: dict[str, Buckets]) -> dict[str, Buckets]:
    """after - before, group by group (a group new in `after` started at zero); groups with
    no observation in between are left out."""
    found = {}
    for group, buckets in after.items():
        old = before.get(group, {})
        new = {bound: count - old.get(bound, 0.0) for bound, count in buckets.items()}
        if total(new) > 0:
            found[group] = new
    return found


def merged(groups: Iterable[Buckets]) -> Buckets:
    """The sum of histograms with the same bounds."""
    found: Buckets = {}
    for buckets in groups:
        for bound, count in buckets.items():
            found[bound] = found.get(bound, 0.0) + count
    return found


def total(buckets: Buckets) -> float:
    """Observations in a cumulative histogram (its +Inf bucket, or its largest)."""
    return buckets.get(math.inf, max(buckets.values(), default=0.0))


def quantile_bound(buckets: Buckets, q: float) -> float | None:
    """The upper bound (s) of the bucket holding the q-quantile (0 < q <= 1) of a cumulative
    histogram: the bucket where the ceil(q * n)-th smallest observation lies; math.inf when
    that is the +Inf bucket, None when the histogram is empty."""
    n = total(buckets)
    if n <= 0:
        return None
    rank = max(1.0, math.ceil(q * n - 1e-9))
    for bound in sorted(buckets):
        if buckets[bound] >= rank:
            return bound
    return math.inf


def bound_text(seconds: float | None, buckets: Buckets) -> str:
    """ "<= 25 ms", "> 10000 ms" (the +Inf bucket) or "-" (nothing observed)."""
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return f"> {max(finite_bounds(buckets), default=0.0) * 1e3:g} ms"
    return f"<= {seconds * 1e3:g} ms"


def finite_bounds(buckets: Buckets) -> list[float]:
    return sorted(b for b in buckets if math.isfinite(b))


def figures(buckets: Buckets) -> dict[str, Any]:
    """count, the cumulative counts, and per quantile its bucket's upper bound in ms (inf:
    the +Inf bucket; None: nothing observed) and as text."""
    found: dict[str, Any] = {
        "count": int(total(buckets)) if buckets else 0,
        "cumulative": [buckets[bound] for bound in sorted(buckets)],  # at each bound, +Inf last
    }
    for name, q in QUANTILES.items():
        bound = quantile_bound(buckets, q)
        found[f"{name}_le_ms"] = None if bound is None else round(bound * 1e3, 6)
        found[name] = bound_text(bound, buckets)
    return found


def server_view(before: str | None, after: str | None, model: str) -> dict[str, Any] | None:
    """What the server saw of `model` between two /metrics scrapes (None without them):
    request durations by outcome (when the histogram carries an outcome label; else all
    outcomes as one, with the counts by outcome from mha_requests_total), the refusals
    together, the queue time of accepted requests and the session runs."""
    if before is None or after is None:
        return None
    requests = delta(
        histogram(before, REQUEST, model, "outcome"), histogram(after, REQUEST, model, "outcome")
    )
    bounds = finite_bounds(merged(histogram(after, REQUEST, model).values()))
    old, new = (
        counter(before, REQUESTS, model, "outcome"),
        counter(after, REQUESTS, model, "outcome"),
    )
    outcomes = {k: int(v - old.get(k, 0.0)) for k, v in sorted(new.items()) if v > old.get(k, 0.0)}
    by_outcome = ALL not in requests and bool(requests)
    view: dict[str, Any] = {
        "bucket_bounds_ms": [round(b * 1e3, 6) for b in bounds],
        "by_outcome": by_outcome,
        "outcomes": outcomes,
        "requests": {k: figures(v) for k, v in sorted(requests.items())},
    }
    if by_outcome:
        view["accepted"] = figures(requests.get(SUCCESS, {}))
        view["refused"] = figures(merged(v for k, v in requests.items() if k != SUCCESS))
    for key, name in (("queue", QUEUE), ("compute", COMPUTE)):
        runs = delta(histogram(before, name, model), histogram(after, name, model))
        view[key] = figures(merged(runs.values()))
    return view
