"""Prometheus metrics of one server, in a registry of its own (no global state).

Names (all labelled model, version):
  mha_requests_total{outcome}          requests finished, outcome = success or a failure reason
  mha_request_duration_seconds         receive -> response, every request
  mha_queue_duration_seconds           submit -> session run start
  mha_compute_duration_seconds         one session run (a batch counts once)
  mha_batch_size_samples               samples per session run
  mha_batch_padding_fraction           padded tokens / all tokens per session run
  mha_queue_depth                      jobs waiting (gauge)
  mha_inflight_requests                requests being handled (gauge)
  mha_model_ready                      1 when loaded and warmed up (gauge)
  mha_model_info{provider, ...}        1, with the execution provider in use
  mha_sequence_step_duration_seconds   one step of a sequence: receive -> response
  mha_sequence_evictions_total{reason} sequences evicted: idle, stream_closed
Server-wide (no labels):
  mha_sequences_active                 sequences holding a KV cache (gauge)
  mha_sequence_cache_bytes             bytes reserved by their caches (gauge)
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets from 100 us to 10 s: CPU requests take ~0.3-50 ms here, GPU less.
_SECONDS = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FRACTION = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
_LABELS = ("model", "version")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._http: WSGIServer | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "mha_requests", "Requests finished", [*_LABELS, "outcome"], registry=r
        )
        self.request_seconds = Histogram(
            "mha_request_duration_seconds",
            "Request duration, from the handler's start to the answer or refusal",
            [*_LABELS, "outcome"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "mha_queue_duration_seconds", "Time queued before compute", _LABELS,
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "mha_compute_duration_seconds", "Session run duration", _LABELS,
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mha_batch_size_samples", "Samples per session run", _LABELS, buckets=_BATCH, registry=r
        )
        self.padding = Histogram(
            "mha_batch_padding_fraction", "Padded tokens / all tokens per session run", _LABELS,
            buckets=_FRACTION, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("mha_queue_depth", "Jobs waiting", _LABELS, registry=r)
        self.inflight = Gauge("mha_inflight_requests", "Requests in progress", _LABELS, registry=r)
        self.ready = Gauge("mha_model_ready", "1 when ready", _LABELS, registry=r)
        self.info = Gauge(
            "mha_model_info", "Model facts; value 1", [*_LABELS, "provider", "target", "dtype"],
            registry=r,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "mha_sequence_step_duration_seconds", "Sequence step duration", _LABELS,
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.sequence_evictions = Counter(
            "mha_sequence_evictions", "Sequences evicted", [*_LABELS, "reason"], registry=r
        )
        self.sequences_active = Gauge("mha_sequences_active", "Active sequences", registry=r)
        self.cache_bytes = Gauge("mha_sequence_cache_bytes", "KV cache bytes reserved", registry=r)

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
        self, model: str, version: str, seconds: float, samples: int, padding_fraction: float
    ) -> None:
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
