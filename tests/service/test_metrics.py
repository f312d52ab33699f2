"""/metrics after traffic: the counts add up and agree with ModelStatistics."""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import RunningServer, random_inputs, settings_for

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.grpc import codec

SUCCESSES = {"self": 9, "cross": 5}
BAD_SHAPES = 3  # invalid_argument on "self"


@pytest.fixture(scope="module", params=["batching", "no-batching"])
def served(request, repository: Path) -> Iterator[RunningServer]:
    """A server with a metrics endpoint on a free port, after a known mix of traffic."""
    settings = settings_for(repository, metrics_port=0, batching=request.param == "batching")
    server = RunningServer(settings).load()
    stub = server.stub
    for model, count in SUCCESSES.items():
        for index in range(count):
            inputs = random_inputs(model, batch=1 + index % 3, length=4 + index, seed=index)
            stub.ModelInfer(codec.infer_request(model, inputs))
    bad = random_inputs("self")
    bad["query"] = bad["query"][..., :32]
    for _ in range(BAD_SHAPES):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(codec.infer_request("self", bad))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(codec.infer_request("nope", bad))
    yield server
    server.close()


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """Samples by name -> {sorted label items: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[name].get(tuple(sorted(labels.items())), 0.0)


def test_metrics_add_up_and_agree_with_model_statistics(served: RunningServer):
    samples = scrape(served.server.metrics_port)  # type: ignore[arg-type]
    stats = {
        s.name: s
        for s in served.stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats
        if s.name in SUCCESSES
    }
    for model, successes in SUCCESSES.items():
        labels = {"model": model, "version": "1"}
        fails = BAD_SHAPES if model == "self" else 0
        stat = stats[model]
        requests = value(samples, "mha_requests_total", **labels, outcome="success")
        assert requests == successes == stat.inference_stats.success.count
        invalid = value(samples, "mha_requests_total", **labels, outcome="invalid_argument")
        assert invalid == fails == stat.inference_stats.fail.count
        durations = "mha_request_duration_seconds_count"
        assert value(samples, durations, **labels, outcome="success") == successes
        assert value(samples, durations, **labels, outcome="invalid_argument") == fails
        assert value(samples, "mha_queue_duration_seconds_count", **labels) == successes
        assert stat.inference_stats.queue.count == stat.inference_stats.compute_infer.count
        # Session runs: one per request without batching, fewer or equal with it.
        runs = value(samples, "mha_compute_duration_seconds_count", **labels)
        assert runs == stat.execution_count == sum(b.compute_infer.count for b in stat.batch_stats)
        assert 1 <= runs <= successes
        # Where they ran: the first in the executor (nothing measured yet), then these tiny
        # runs on the event loop (under --inline-runs-under-us, 20 ms on CPU).
        on_loop = value(samples, "mha_session_runs_total", **labels, place="loop")
        in_executor = value(samples, "mha_session_runs_total", **labels, place="executor")
        assert on_loop + in_executor == runs and in_executor >= 1 and on_loop >= 1
        compute_ns = sum(b.compute_infer.ns for b in stat.batch_stats)
        seconds = value(samples, "mha_compute_duration_seconds_sum", **labels)
        assert seconds * 1e9 == pytest.approx(compute_ns, abs=runs)  # ns rounding per run
        samples_run = value(samples, "mha_batch_size_samples_sum", **labels)
        assert samples_run == stat.inference_count == sum(1 + i % 3 for i in range(successes))
        assert samples_run == sum(b.batch_size * b.compute_infer.count for b in stat.batch_stats)
        assert value(samples, "mha_batch_size_samples_count", **labels) == runs
        assert value(samples, "mha_inflight_requests", **labels) == 0
        assert value(samples, "mha_model_ready", **labels) == 1
        info = value(samples, "mha_model_info", **labels, provider="CPUExecutionProvider",
                     target="ort", dtype="FP32")  # fmt: skip
        assert info == 1
    unknown = value(samples, "mha_requests_total", model="", version="", outcome="not_found")
    assert unknown == 1
