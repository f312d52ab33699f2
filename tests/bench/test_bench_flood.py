"""`mha bench flood`: the report logic on given answers, the random requests, one tiny run.

Not a timed test: the end-to-end run checks that every phase runs and reports (bursts of
20, a random run of 50 on a d_model 64 model), never how the server fared; the targets'
verdicts are asserted only on answers made up here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import link_repository
from test_bench_cli import SCRIPT

from mha.bench.framework import probes
from mha.bench.framework.unary import Answer
from mha.bench.scenarios import bursts
from mha.bench.scenarios.garbage import KINDS, RandomRequests, Shapes
from mha.proto import grpc_predict_v2_pb2 as pb

SHAPES = Shapes("tiny", 64, "FP32", 64, 4096, 1 << 20)


@pytest.fixture(scope="module")
def flood_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding one small self-attention model (d_model 64, 4 heads) as "tiny"."""
    root = tmp_path_factory.mktemp("flood-repo")
    return link_repository(root, exported, {"tiny": {"target": "ort"}})


def answers(*spec: tuple[str, str, float, int]) -> list[Answer]:
    """(code, details, ms, count) -> that many answers."""
    return [Answer("burst", c, d, ms / 1e3) for c, d, ms, n in spec for _ in range(n)]


def burst_record(found: list[Answer], run_ms: float | None, probe: str = "OK") -> dict:
    return {
        "name": "burst",
        "summary": bursts.summarize(found),
        "server": {"run_ms": run_ms},
        "probe": {"code": probe},
    }


def verdicts(targets: list[dict]) -> list[bool | None]:
    return [t["ok"] for t in targets]


def test_retryable_refusals_with_reasons_pass_every_burst_target() -> None:
    found = answers(("OK", "", 900.0, 90), ("UNAVAILABLE", "queue full; retry later", 5.0, 10))
    targets = bursts.burst_targets(burst_record(found, run_ms=20.0), 1000.0)
    assert verdicts(targets) == [True, True, True, True, True]
    assert targets[3]["bound"] == 1040.0  # max queue delay + 2 run times


def test_cancelled_and_library_details_miss() -> None:
    found = answers(("OK", "", 10.0, 50), ("CANCELLED", "CANCELLED", 100.0, 3),
                    ("UNAVAILABLE", "Socket closed", 1.0, 2),
                    ("RESOURCE_EXHAUSTED", "input 'query': over the limit", 60.0, 1))  # fmt: skip
    summary = bursts.summarize(found)
    assert summary["codes"] == {"CANCELLED": 3, "OK": 50, "RESOURCE_EXHAUSTED": 1,
                                "UNAVAILABLE": 2}  # fmt: skip
    assert summary["unfit"] == 5 and summary["forbidden"] == 3
    assert summary["details"]["CANCELLED"] == [["CANCELLED", 3]]
    targets = bursts.burst_targets(burst_record(found, run_ms=1.0, probe="UNAVAILABLE"), 0)
    # accepted p99 has no bound when the queue delay is off (0)
    assert verdicts(targets) == [False, False, False, None, False]


def test_details_group_by_template() -> None:
    found = answers(("INVALID_ARGUMENT", "raw contents are 10 bytes, needs 12", 1.0, 2),
                    ("INVALID_ARGUMENT", "raw contents are 7 bytes, needs 8", 1.0, 1))  # fmt: skip
    [[example, count]] = bursts.summarize(found)["details"]["INVALID_ARGUMENT"]
    assert count == 3 and example == "raw contents are 10 bytes, needs 12"


def test_a_burst_without_refusals_has_no_refusal_verdict() -> None:
    targets = bursts.burst_targets(burst_record(answers(("OK", "", 5.0, 4)), None), 1000)
    assert verdicts(targets) == [True, True, None, None, True]


def test_random_run_targets() -> None:
    found = [Answer("garbage", "INVALID_ARGUMENT", "not a ModelInferRequest", 0.001),
             Answer("malformed", "INTERNAL", "internal error", 0.001)]  # fmt: skip
    record = {"name": "random", "summary": bursts.summarize(found), "probe": {"code": "OK"},
              "rss_mb": {"warm": 100.0, "after": 130.0, "quiet": 119.0}}  # fmt: skip
    targets = bursts.random_targets(record, 0.2)
    assert verdicts(targets) == [False, True, True]
    record["rss_mb"]["quiet"] = 121.0
    assert verdicts(bursts.random_targets(record, 0.2))[1] is False
    record["rss_mb"] = {"warm": None, "after": None, "quiet": None}  # no pid: unknown
    assert verdicts(bursts.random_targets(record, 0.2))[1] is None


def buckets_text(name: str, labels: str, counts: list[float]) -> str:
    """Prometheus text of one histogram series: cumulative counts at 1, 10, 100 ms, +Inf."""
    bounds = ["0.001", "0.01", "0.1", "+Inf"]
    lines = [f'{name}_bucket{{le="{b}",{labels}}} {c}' for b, c in zip(bounds, counts, strict=True)]
    return "\n".join([*lines, f"{name}_count{{{labels}}} {counts[-1]}", ""])


def test_histogram_delta_quantiles_are_bucket_bounds() -> None:
    name = probes.REQUEST
    ok1, ok2 = 'model="m",outcome="success",version="1"', 'model="m",outcome="success",version="2"'
    full = 'model="m",outcome="queue_full",version="1"'
    other = 'model="other",outcome="success",version="1"'
    before = buckets_text(name, ok1, [1, 2, 2, 2]) + buckets_text(name, other, [5, 5, 5, 5])
    after = (
        buckets_text(name, ok1, [1, 2, 60, 61])  # + 58 between 10 and 100 ms, 1 past 100
        + buckets_text(name, ok2, [0, 0, 39, 39])  # a new series: + 39 between 10 and 100
        + buckets_text(name, full, [99, 100, 100, 100])  # + 99 under 1 ms, 1 under 10
        + buckets_text(name, other, [50, 50, 50, 50])  # another model: left out
    )
    deltas = probes.delta(
        probes.histogram(before, name, "m", "outcome"),
        probes.histogram(after, name, "m", "outcome"),
    )
    assert deltas["success"] == {0.001: 0, 0.01: 0, 0.1: 97, math.inf: 98}
    assert probes.quantile_bound(deltas["success"], 0.5) == 0.1
    assert probes.quantile_bound(deltas["success"], 0.99) == math.inf  # the 98th of 98
    assert probes.quantile_bound(deltas["queue_full"], 0.99) == 0.001  # the 99th of 100
    assert probes.quantile_bound(deltas["queue_full"], 1.0) == 0.01
    assert probes.quantile_bound({0.001: 0, math.inf: 0}, 0.5) is None
    view = probes.server_view(before, after, "m")
    assert view is not None and view["by_outcome"]
    assert view["bucket_bounds_ms"] == [1, 10, 100]
    assert view["accepted"] == {
        "count": 98,
        "cumulative": [0, 0, 97, 98],
        "p50_le_ms": 100,
        "p50": "<= 100 ms",
        "p99_le_ms": math.inf,
        "p99": "> 100 ms",
    }  # p99 past the last bound: null in the JSON
    assert view["refused"]["count"] == 100 and view["refused"]["p99"] == "<= 1 ms"
    assert view["queue"]["count"] == 0 and view["queue"]["p99"] == "-"
    # The same histogram without an outcome label: one group, counts from the counter.
    plain = after.replace('outcome="success",', "").replace('outcome="queue_full",', "")
    plain += 'mha_requests_total{model="m",outcome="queue_full",version="1"} 100.0\n'
    view = probes.server_view(plain, plain.replace("} 100.0", "} 107.0"), "m")
    assert view is not None and not view["by_outcome"] and view["requests"] == {}
    assert view["outcomes"] == {"queue_full": 7}


def test_burst_breakdown_tables_and_sentence() -> None:
    name = probes.REQUEST
    ok, full = (
        'model="m",outcome="success",version="1"',
        'model="m",outcome="queue_delay",version="1"',
    )
    after = buckets_text(name, ok, [0, 0, 90, 90]) + buckets_text(name, full, [8, 8, 8, 8])
    reset = "Stream removed (RST_STREAM with error code 7)"
    found = answers(("OK", "", 900.0, 90), ("UNAVAILABLE", "queue delay over the bound", 400.0, 8),
                    ("UNAVAILABLE", reset, 30.0, 2))  # fmt: skip
    record = {"name": "burst A", "wall_s": 2.0, "summary": bursts.summarize(found),
              "server_view": probes.server_view("", after, "m"),
              "sent": {"bytes": 98 * 1_000_000, "mb_per_s": 49.0}}  # fmt: skip
    record["breakdown"] = split = bursts.breakdown(record)
    assert split["server_scope"] == "by outcome"
    assert split["accepted"] == {"client_p99_ms": 900.0, "server_p99_le_ms": 100.0,
                                 "wire_client_ms": 800.0, "coarse": False}  # fmt: skip
    assert split["refused"]["server_p99_le_ms"] == 1.0
    faster = dict(record, summary=bursts.summarize(answers(("OK", "", 50.0, 10))))
    assert bursts.breakdown(faster)["accepted"]["coarse"]  # <= 100 ms says nothing of 50
    assert "| every refusal | 8 " in bursts.server_table([record])
    assert "HTTP/2 2" in bursts.transfer_table([record])
    sentence = bursts.server_sentence(record)
    assert sentence.startswith(
        "burst A server side: refusals answered in <= 1 ms (p99) after the handler started; "
        "accepted <= 100 ms; client side p99 "
    ), sentence
    assert "transfer of 98 MB" in sentence and "2 refusals came from the transport" in sentence


def test_refusal_sources() -> None:
    assert bursts.source("Stream removed (RST_STREAM with error code 7)") == "HTTP/2"
    assert bursts.source("Concurrent RPC limit exceeded!") == "gRPC"
    assert bursts.source("Deadline Exceeded") == "gRPC"
    assert bursts.source("queue full; retry later") == "server"
    found = answers(("OK", "", 900.0, 5),
                    ("UNAVAILABLE", "Received RST_STREAM with error code 7", 5.0, 2),
                    ("RESOURCE_EXHAUSTED", "Concurrent RPC limit exceeded!", 5.0, 3),
                    ("DEADLINE_EXCEEDED", "Deadline Exceeded", 5.0, 1),
                    ("UNAVAILABLE", "queue full", 5.0, 4))  # fmt: skip
    summary = bursts.summarize(found)
    assert summary["sources"] == {"server": 4, "gRPC": 4, "HTTP/2": 2}
    assert summary["before_handler"] == {"HTTP/2": 2, "gRPC": 3}  # not the client's deadline
    assert summary["unfit"] == 3  # the PASS/MISS rule is the same as before


def test_random_requests_are_replayable_and_cover_every_kind() -> None:
    requests = RandomRequests(SHAPES, seed=3)
    assert requests.make(7) == RandomRequests(SHAPES, seed=3).make(7)
    made = [requests.make(i) for i in range(600)]
    assert {kind for kind, _ in made} == set(KINDS)
    for kind, body in made:
        if kind in ("valid", "large", "off_by_one"):
            request = pb.ModelInferRequest.FromString(body)
            query = request.inputs[0]
            needed = query.shape[0] * query.shape[1] * query.shape[2] * 4
            got = len(request.raw_input_contents[0])
            assert (got == needed) == (kind != "off_by_one"), (kind, list(query.shape), got)
            assert got <= SHAPES.max_send_bytes + 4


def test_tiny_flood_runs_every_phase(flood_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mha.cli", "bench", "flood", "--repository", str(flood_repo),
               "--model", "tiny", "--burst-a", "20", "--burst-b", "20", "--random", "50",
               "--quiet-seconds", "0.2", "--threads", "1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    assert [p["name"] for p in document["phases"]] == ["burst A", "burst B", "random"]
    for phase, count in zip(document["phases"], (20, 20, 50), strict=True):
        summary = phase["summary"]
        assert summary["requests"] == sum(summary["codes"].values()) == count, phase
        assert phase["probe"]["code"], phase
    burst_a, _, random_run = document["phases"]
    assert burst_a["shape"] == "(8,128)" and burst_a["rss_mb"]["before"] > 0
    assert burst_a["server"]["runs"] >= 1  # /metrics of the server it started
    view = burst_a["server_view"]  # /metrics deltas: every burst request reached the server
    assert view is not None and view["bucket_bounds_ms"] and view["compute"]["count"] >= 1
    assert sum(view["outcomes"].values()) + sum(burst_a["summary"]["before_handler"].values()) == 20
    assert burst_a["sent"]["bytes"] >= 20 * 8 * 128 * 64 * 4 or burst_a["summary"]["before_handler"]
    assert set(burst_a["breakdown"]) == {"server_scope", "accepted", "refused"}
    assert sum(sum(c.values()) for c in random_run["kinds"].values()) == 50
    assert set(random_run["rss_mb"]) == {"warm", "after", "quiet"}
    assert {t["phase"] for t in document["targets"]} == {"burst A", "burst B", "random"}
    assert all(t["ok"] in (True, False, None) for t in document["targets"])
    assert len(document["machine"]["loadavg_before"]) == 3
    assert document["max_queue_delay_ms"]["value"] >= 0
    markdown = (out / "bench.md").read_text()
    for title in ("## bursts", "## bursts, server side", "bucket bounds (ms)",
                  "burst A server side:", "burst B server side:",
                  "## refusals by code and details", "## random requests",
                  "## targets", "load average"):  # fmt: skip
        assert title in markdown and title in run.stdout
    lines = [line for line in run.stdout.splitlines() if line.startswith(("PASS", "MISS", "n/a"))]
    assert len(lines) == len(document["targets"])


def test_flood_exits_2_when_the_server_cannot_start(flood_repo: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mha.cli", "bench", "flood", "--repository", str(flood_repo),
               "--model", "tiny", "--server-arg=--no-such-flag",
               "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "mha serve exited" in run.stderr and not (tmp_path / "bench.json").exists()


def test_flood_help_loads_no_export_tools() -> None:
    argv = [sys.executable, "-c", SCRIPT, "bench", "flood", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("[] "), done.stdout + done.stderr
