"""Prometheus metrics of one server, in a registry of its own (no global state).

Names (all labelled model, version):
  mha_requests_total{outcome}          requests finished, outcome = success or a failure reason
  mha_request_duration_seconds         receive -> response, every request
  mha_queue_duration_seconds           submit -> session run start
  mha_compute_duration_seconds         one session run (a batch counts once)
  mha_session_runs_total{place}        session runs, place = loop (on the event loop) or executor
  mha_batch_size_samples               samples per session run
  mha_batch_padding_fraction           padded tokens / all tokens per session run
  mha_queue_depth                      jobs waiting (gauge)
  mha_inflight_requests                requests being handled (gauge)
  mha_model_ready                      1 when loaded and warmed up (gauge)
  mha_model_info{provider, ...}        1, with the execution provider in use
  mha_sequence_step_duration_seconds   one step of a sequence: receive -> response
  mha_sequence_evictions_total{reason} sequences evicted: idle, stream_closed
  mha_kv_cache_blocks{state}           KV blocks of the version's pool: in_use, or free (of its
                                       size, what the shared budget has left) (gauge)
Server-wide (no labels):
  mha_sequences_active                 sequences holding a KV cache (gauge)
  mha_sequence_cache_bytes             bytes of the KV blocks their caches hold (gauge)
  mha_sequence_cache_rows_bytes        bytes of the rows filled in those blocks (gauge)

The ones every request records (requests, the durations, batch size, padding, in flight)
are this module's own light families, read by the registry at scrape time:
prometheus_client's own types lock and check on each of the ~18 updates a request made,
~10 us a request. They export the same samples except `_created`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

# Latency buckets from 100 us to 10 s: CPU requests take ~0.3-50 ms here, GPU less.
_SECONDS = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FRACTION = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
_LABELS = ("model", "version")


class _Child:
    """One label set's figures; `lock` because batch runs record from executor threads."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()


class _CounterChild(_Child):
    __slots__ = ("value",)

    def __init__(self) -> None:
        super().__init__()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self.lock:
            self.value += amount


class _GaugeChild(_CounterChild):
    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        with self.lock:
            self.value -= amount

    def set(self, value: float) -> None:
        with self.lock:
            self.value = float(value)


class _HistogramChild(_Child):
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__()
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)  # the first bound >= value: le
        with self.lock:
            self.counts[index] += 1
            self.sum += value


class _Light:
    """A labelled family of one kind, its children read at scrape time (LightCollector)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        with self._lock:
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = self._new_child()
            return child

    def _new_child(self) -> Any:
        raise NotImplementedError

    def children(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._children.items())

    def family(self) -> Metric:
        raise NotImplementedError


class LightCounter(_Light):
    child_type: type[_CounterChild] = _CounterChild
    family_type: type[CounterMetricFamily | GaugeMetricFamily] = CounterMetricFamily

    def _new_child(self) -> _CounterChild:
        return self.child_type()

    def family(self) -> Metric:
        family = self.family_type(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children():
            family.add_metric(list(values), child.value)
        return family


class LightGauge(LightCounter):
    child_type = _GaugeChild
    family_type = GaugeMetricFamily


class LightHistogram(_Light):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(b) for b in buckets)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bounds = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for values, child in self.children():
            with child.lock:
                counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, total)
        return family


class LightCollector:
    """The registry's view of the light families."""

    def __init__(self) -> None:
        self.families: list[_Light] = []

    def add(self, family: Any) -> Any:
        self.families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._http: WSGIServer | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        light = LightCollector()
        self.requests = light.add(
            LightCounter("mha_requests", "Requests finished", [*_LABELS, "outcome"])
        )
        self.request_seconds = light.add(
            LightHistogram(
                "mha_request_duration_seconds",
                "Request duration, from the handler's start to the answer or refusal",
                [*_LABELS, "outcome"], _SECONDS,
            )
        )  # fmt: skip
        self.queue_seconds = light.add(
            LightHistogram(
                "mha_queue_duration_seconds", "Time queued before compute", _LABELS, _SECONDS
            )
        )
        self.runs = light.add(
            LightCounter("mha_session_runs", "Session runs by where they ran", [*_LABELS, "place"])
        )
        self.compute_seconds = light.add(
            LightHistogram(
                "mha_compute_duration_seconds", "Session run duration", _LABELS, _SECONDS
            )
        )
        self.batch_size = light.add(
            LightHistogram("mha_batch_size_samples", "Samples per session run", _LABELS, _BATCH)
        )
        self.padding = light.add(
            LightHistogram(
                "mha_batch_padding_fraction", "Padded tokens / all tokens per session run",
                _LABELS, _FRACTION,
            )
        )  # fmt: skip
        self.queue_depth = light.add(LightGauge("mha_queue_depth", "Jobs waiting", _LABELS))
        self.inflight = light.add(
            LightGauge("mha_inflight_requests", "Requests in progress", _LABELS)
        )
        self.ready = Gauge("mha_model_ready", "1 when ready", _LABELS, registry=r)
        self.info = Gauge(
            "mha_model_info", "Model facts; value 1", [*_LABELS, "provider", "target", "dtype"],
            registry=r,
        )  # fmt: skip
        self.step_seconds = light.add(
            LightHistogram(
                "mha_sequence_step_duration_seconds", "Sequence step duration", _LABELS, _SECONDS
            )
        )
        self.sequence_evictions = Counter(
            "mha_sequence_evictions", "Sequences evicted", [*_LABELS, "reason"], registry=r
        )
        self.sequences_active = Gauge("mha_sequences_active", "Active sequences", registry=r)
        self.cache_bytes = Gauge("mha_sequence_cache_bytes", "KV cache bytes held", registry=r)
        self.cache_rows_bytes = Gauge(
            "mha_sequence_cache_rows_bytes", "KV cache bytes of filled rows", registry=r
        )
        self.cache_blocks = Gauge(
            "mha_kv_cache_blocks", "KV cache blocks", [*_LABELS, "state"], registry=r
        )
        r.register(light)  # type: ignore[arg-type]

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached: labels() validates and locks on every call, which
        cost ~25 us a request over the eight a request records. Labels are model names and
        versions the server holds, so the cache stays small."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def request_done(self, model: str, version: str, outcome: str, seconds: float) -> None:
        self.child(self.requests, model, version, outcome).inc()
        self.child(self.request_seconds, model, version, outcome).observe(seconds)

    def queued(self, model: str, version: str, seconds: float) -> None:
        self.child(self.queue_seconds, model, version).observe(seconds)

    def batch_run(
        self, model: str, version: str, seconds: float, samples: int, padding_fraction: float,
        *, inline: bool = False,
    ) -> None:  # fmt: skip
        """One session run; `inline`: it ran on the event loop, not in the executor."""
        self.child(self.runs, model, version, "loop" if inline else "executor").inc()
        self.child(self.compute_seconds, model, version).observe(seconds)
        self.child(self.batch_size, model, version).observe(samples)
        self.child(self.padding, model, version).observe(padding_fraction)

    def model_loaded(
        self, model: str, version: str, provider: str, target: str, dtype: str
    ) -> None:
        self.info.labels(model, version, provider, target, dtype).set(1)
        self.ready.labels(model, version).set(1)

    def model_unready(self, model: str, version: str) -> None:
        self.ready.labels(model, version).set(0)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; return the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def shutdown(self) -> None:
        """Stop the /metrics endpoint, if serve() started one."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
