"""`mha bench serve`: the --quick smoke test, the echo contender, the bound and the targets.

Not a timed test: it checks the benchmark works, not how fast the server is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import link_repository

from mha.bench.framework import report
from mha.bench.framework.contenders import Contenders
from mha.bench.scenarios import bounds
from mha.bench.scenarios.points import PRESETS, Goals, plan
from mha.client import Client, ClientError
from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.grpc import codec

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def bench_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding one small self-attention model (d_model 64, 4 heads) as "tiny"."""
    root = tmp_path_factory.mktemp("bench-repo")
    return link_repository(root, exported, {"tiny": {"target": "ort"}})


@pytest.fixture(scope="module")
def contenders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contenders]:
    """The servers the tests below start, stopped (and their port files removed) after."""
    with Contenders(tmp_path_factory.mktemp("bench-logs"), threads=1) as started:
        yield started


def test_quick_bench_covers_every_configuration(bench_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mha.cli", "bench", "serve", "--quick",
               "--repository", str(bench_repo), "--model", "tiny", "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    points = document["points"]
    assert {p["config"] for p in points} == {"on", "off", "floor", "echo", "inprocess"}
    assert {p["workload"] for p in points} == {"1x16", "1x8-32"}
    for p in points:
        assert p["errors"] == {}, p
        assert p["requests"] > 0 and p["rps"] > 0, p
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"], p
    merged = [p for p in points if p["merge"] == 4]
    assert merged and all(p["config"] == "inprocess" for p in merged)
    on_mix = next(p for p in points if p["config"] == "on" and p["workload"] == "1x8-32")
    assert 0 <= on_mix["padding_fraction"] <= 1 and on_mix["mean_batch"] >= 1
    assert set(document["servers"]) == {"on", "off", "floor", "echo"}
    for server in document["servers"].values():
        assert server["startup_s"] > 0 and server["rss_mb"] > 0  # measured, not bounded
    targets = document["targets"]
    assert {t["target"].split(":")[0] for t in targets} >= {"1x8-32"}
    assert {t["verdict"] for t in targets} <= {"PASS", "MISS", "n/a"}
    goals = [t for t in targets if t["target"].startswith(("no-compute", "server", "batching"))]
    assert {t["target"].split(" (")[0] for t in goals} == {"no-compute", "server", "batching"}
    assert all(t["verdict"] != "n/a" for t in goals), goals  # every figure was measured
    assert document["bounds"]["1x16"]["bound_rps"] > 0
    for t in goals:
        line = f"{t['verdict']}  {t['target']}: measured "
        assert line in run.stdout
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    titles = ("end-to-end latency and throughput", "batching on vs off", "serving process")
    for title in (*titles, "against the echo server and the bound", "targets"):
        assert title in run.stdout


def test_open_loop_against_an_external_server(
    bench_repo: Path, contenders: Contenders, tmp_path: Path
) -> None:
    server = contenders.serve("off", bench_repo, "off")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mha.cli", "bench", "serve", "--url", server.url,
               "--model", "tiny", "--configs", "external", "--workloads", "1x16",
               "--rate", "100", "--duration", "0.5", "--warmup", "0.1", "--no-plot",
               "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    server.check_alive()  # still serving
    assert run.returncode == 0, run.stdout + run.stderr
    [point] = json.loads((out / "bench.json").read_text())["points"]
    assert point["config"] == "external" and point["rate"] == 100 and point["errors"] == {}
    # How many Poisson arrivals fit in 0.5 s depends on the machine's load: only that some
    # were sent and answered is a property of the code.
    assert point["requests"] > 0 and point["p50_ms"] <= point["p99_ms"]


def test_echo_answers_with_the_request_shape(bench_repo: Path, contenders: Contenders) -> None:
    server = contenders.echo(bench_repo / "tiny" / "1")
    try:
        with Client(server.url, timeout=10) as client:
            assert client.live() and client.ready() and client.model_ready("tiny")
            width = client.model_metadata("tiny").inputs[0].shape[-1]
            rng = np.random.default_rng(0)
            for batch, length in ((1, 16), (2, 16), (1, 16), (1, 17)):  # (1, 16) again: cached
                query = rng.standard_normal((batch, length, width)).astype(np.float32)
                result = client.infer("tiny", {"query": query})
                assert result.outputs["output"].shape == (batch, length, width)
                assert result.outputs["output"].dtype == np.float32
            with pytest.raises(ClientError) as caught:
                client.model_metadata("other")
            assert caught.value.code == grpc.StatusCode.NOT_FOUND
            assert caught.value.details == "echo serves 'tiny' only"
        query = np.zeros((8, 32, width), dtype=np.float32)
        with grpc.insecure_channel(server.url) as channel:
            call = channel.unary_unary(MODEL_INFER)  # no serializers: bytes in and out
            raw = call(codec.infer_request("tiny", {"query": query}).SerializeToString())
            with pytest.raises(grpc.RpcError) as refused:
                call(b"\xff not a request")
        response = pb.ModelInferResponse.FromString(raw)
        [output] = response.outputs
        assert (output.name, output.datatype, list(output.shape)) == (
            "output",
            "FP32",
            [8, 32, width],
        )
        assert len(response.raw_output_contents[0]) == 8 * 32 * width * 4
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("echo: ")
    finally:
        assert server.stop() == 0


def test_bound_is_one_over_the_sum_of_inverses() -> None:
    assert bounds.bound(100.0, 100.0) == 50.0
    assert bounds.bound(300.0, 600.0) == pytest.approx(200.0)
    for missing in ((math.nan, 100.0), (100.0, math.nan), (0.0, 100.0)):
        assert math.isnan(bounds.bound(*missing))


def _point(config: str, clients: int, rps: float, p50: float = 1.0, p99: float = 2.0) -> dict:
    return {"config": config, "workload": "1x16", "concurrency": clients, "rate": 0.0,
            "merge": 1, "rps": rps, "p50_ms": p50, "p99_ms": p99}  # fmt: skip


def test_goal_targets_on_made_up_figures() -> None:
    points = [
        _point("echo", 16, 1000.0), _point("echo", 1, 900.0, p50=0.5),
        _point("inprocess", 16, 1000.0), _point("inprocess", 1, 2000.0, p50=0.2),
        _point("floor", 16, 960.0), _point("floor", 1, 800.0, p50=0.65),
        _point("on", 16, 460.0, p99=2.0), _point("on", 1, 500.0, p50=0.9),
        _point("off", 16, 470.0, p99=3.0),
        _point("rate-only", 1, 1.0) | {"config": "on", "rate": 50.0, "p50_ms": 0.1},
    ]  # fmt: skip
    goals = Goals(("1x16",), ("1x16",), ("1x16",), bound_clients=16, batching_clients=(16, 32))
    found = {t["target"]: t for t in bounds.goal_targets(points, goals)}
    expected = {  # name: (verdict, measured, bound)
        "no-compute (1,16) req/s c=16 >= 95% of echo": ("PASS", 960.0, 950.0),
        "no-compute (1,16) p50 ms c=1 <= echo + 0.1 ms": ("MISS", 0.65, 0.6),
        "server (1,16) req/s c=16 >= 90% of bound": ("PASS", 460.0, 450.0),  # bound 500
        "server (1,16) p50 ms c=1 <= echo + in-process + 0.15 ms": ("MISS", 0.9, 0.85),
        "batching (1,16) req/s c=16 on >= off": ("MISS", 460.0, 470.0),
        "batching (1,16) p99 ms c=16 on <= off": ("PASS", 2.0, 3.0),
    }
    for name, (verdict, value, bound) in expected.items():
        t = found.pop(name)
        assert report.verdict(t["ok"]) == verdict, name
        assert t["value"] == pytest.approx(value) and t["bound"] == pytest.approx(bound), name
    assert {report.verdict(t["ok"]) for t in found.values()} == {"n/a"}  # nothing at c=32
    assert len(found) == 2
    lines = report.target_lines(bounds.goal_targets(points, goals)).splitlines()
    assert lines[0] == "PASS  no-compute (1,16) req/s c=16 >= 95% of echo: measured 960, bound 950"


@pytest.mark.parametrize("preset", ["full", "targets", "quick"])
def test_plans_measure_every_figure_their_targets_need(preset: str) -> None:
    configs = ("on", "off", "floor", "echo", "inprocess")
    points = [
        {"config": p.config, "workload": p.workload.name, "concurrency": p.concurrency,
         "rate": p.rate, "merge": p.merge, "rps": 1.0, "p50_ms": 1.0, "p99_ms": 1.0}
        for p, _ in plan(PRESETS[preset], configs)
    ]  # fmt: skip
    [goals] = [p.goals for p in PRESETS[preset] if p.goals is not None]
    targets = bounds.goal_targets(points, goals)
    assert targets and all(t["ok"] is not None for t in targets)


def test_rounds_interleave_contenders_and_pool_medians(bench_repo: Path, tmp_path: Path) -> None:
    """--rounds 3: every server up at once, each point measured per contender per round (the
    order rotating), the record's req/s the median of its rounds."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mha.cli", "bench", "serve", "--repository", str(bench_repo),
               "--model", "tiny", "--out", str(out), "--no-plot", "--configs", "off,echo,inprocess",
               "--workloads", "1x16", "--concurrency", "1,4", "--duration", "0.15",
               "--warmup", "0.05", "--rounds", "3"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    assert document["rounds"] == 3
    points = document["points"]
    assert len(points) == 6 and set(document["servers"]) == {"off", "echo"}
    for p in points:
        assert len(p["rounds"]) == 3 and p["rps"] == sorted(p["rounds"])[1], p
        assert p["errors"] == {} and p["requests"] > 0, p
    # Progress lines on stderr, in measuring order: each round of a point visits every
    # contender before the next point, starting one contender later each round.
    order = [
        line.split("] ")[-1].split()[:3] for line in run.stderr.splitlines() if "req/s" in line
    ]
    assert len(order) == 18
    one_client = [config for config, _workload, clients in order if clients == "c=1"]
    assert one_client == ["off", "echo", "inprocess", "echo", "inprocess", "off",
                          "inprocess", "off", "echo"]  # fmt: skip


def test_rounds_below_one_are_refused(bench_repo: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mha.cli", "bench", "serve", "--repository", str(bench_repo),
               "--model", "tiny", "--out", str(tmp_path), "--rounds", "0"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--rounds 0: need at least 1" in run.stderr
