"""ModelStatistics accumulators (Triton's semantics) fed from the same events as Prometheus.

Per model version, as proto/grpc_predict_v2.proto describes (mha.service.grpc.messages turns
a VersionStats into its ModelStatistics message):
  inference_stats.success / fail   requests, receive -> response (count, total ns)
  inference_stats.queue            successful requests' time queued before compute
  inference_stats.compute_infer    successful requests' compute time (a shared batch run
                                   counts in full for each request it served)
  inference_count                  samples (B) of successful requests
  execution_count                  session runs (a batch of requests counts once)
  batch_stats[batch_size]          session runs of that many samples: compute_infer
  last_inference                   ms since the epoch of the last request

StatsMetrics extends Metrics so that every recorded event lands in both places: the
Prometheus counters and ModelStatistics cannot drift apart.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from mha.service.core.metrics import Metrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)


@dataclass
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))


class Statistics:
    """Thread-safe: batch runs are recorded from scheduler threads and the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], VersionStats] = defaultdict(VersionStats)

    def success(
        self, model: str, version: str, request_ns: int, queue_ns: int, compute_ns: int,
        samples: int,
    ) -> None:  # fmt: skip
        with self._lock:
            stats = self._stats[model, version]
            stats.success.add(request_ns)
            stats.queue.add(queue_ns)
            stats.compute_infer.add(compute_ns)
            stats.inference_count += samples
            stats.last_inference_ms = int(time.time() * 1000)

    def failure(self, model: str, version: str, request_ns: int) -> None:
        with self._lock:
            stats = self._stats[model, version]
            stats.fail.add(request_ns)
            stats.last_inference_ms = int(time.time() * 1000)

    def execution(self, model: str, version: str, compute_ns: int, samples: int) -> None:
        with self._lock:
            stats = self._stats[model, version]
            stats.execution_count += 1
            stats.batches[samples].add(compute_ns)

    def totals(self) -> tuple[int, int]:
        """(successful, failed) requests over every model version."""
        with self._lock:
            stats = list(self._stats.values())
        return sum(s.success.count for s in stats), sum(s.fail.count for s in stats)

    def snapshot(self, model: str, version: str) -> VersionStats:
        """A copy of one version's figures, consistent at one instant."""
        with self._lock:
            return copy.deepcopy(self._stats[model, version])


class StatsMetrics(Metrics):
    """Metrics that also feed Statistics, so ModelStatistics agrees with /metrics."""

    def __init__(self, statistics: Statistics, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.statistics = statistics

    def batch_run(
        self, model: str, version: str, seconds: float, samples: int, padding_fraction: float,
        *, inline: bool = False,
    ) -> None:  # fmt: skip
        super().batch_run(model, version, seconds, samples, padding_fraction, inline=inline)
        self.statistics.execution(model, version, int(seconds * 1e9), samples)
