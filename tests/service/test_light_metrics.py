"""The light metric families export what prometheus_client's own types export."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mha.service.core.metrics import LightCollector, LightCounter, LightGauge, LightHistogram

BOUNDS = (1e-4, 2.5e-4, 1e-3, 0.01, 1, 10)
LABELS = ("model", "outcome")


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text format's lines without the _created samples (the light ones have none)."""
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines if "_created" not in line]


def registries() -> tuple[CollectorRegistry, CollectorRegistry, LightCollector]:
    theirs, ours, light = CollectorRegistry(), CollectorRegistry(), LightCollector()
    ours.register(light)  # type: ignore[arg-type]
    return theirs, ours, light


label_sets = st.sampled_from([("a", "success"), ("b", "success"), ("a", "invalid_argument")])


@settings(derandomize=True, database=None, deadline=None, max_examples=100)
@given(st.lists(st.tuples(label_sets, st.floats(0, 20) | st.sampled_from(BOUNDS)), max_size=40))
def test_histogram_and_counter_export_the_same_samples(observations) -> None:
    theirs, ours, light = registries()
    histograms = (
        Histogram("h_seconds", "doc", LABELS, buckets=BOUNDS, registry=theirs),
        light.add(LightHistogram("h_seconds", "doc", LABELS, BOUNDS)),
    )
    counters = (
        Counter("c", "doc", LABELS, registry=theirs),
        light.add(LightCounter("c", "doc", LABELS)),
    )
    for labels, seconds in observations:
        for histogram in histograms:
            histogram.labels(*labels).observe(seconds)
        for counter in counters:
            counter.labels(*labels).inc()
    assert exposition(ours) == exposition(theirs)


def test_gauge_exports_the_same_samples() -> None:
    theirs, ours, light = registries()
    gauges = (Gauge("g", "doc", LABELS, registry=theirs), light.add(LightGauge("g", "doc", LABELS)))
    for gauge in gauges:
        gauge.labels("a", "x").inc()
        gauge.labels("a", "x").inc()
        gauge.labels("a", "x").dec()
        gauge.labels("b", "y").inc(3)
        gauge.labels("c", "z").set(7)
    assert exposition(ours) == exposition(theirs)


def test_updates_from_threads_are_all_counted() -> None:
    histogram = LightHistogram("h", "doc", (), BOUNDS)
    child = histogram.labels()
    start = threading.Barrier(4)

    def observe() -> None:
        start.wait()
        for _ in range(20_000):
            child.observe(0.5)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(child.counts) == 80_000 and child.sum == 40_000.0
