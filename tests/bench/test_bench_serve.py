"""Smoke test of `mha bench serve --quick`: every configuration runs and reports sane numbers.

Not a timed test: it checks the benchmark works, not how fast the server is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import link_repository


@pytest.fixture(scope="module")
def bench_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding one small self-attention model (d_model 64, 4 heads) as "tiny"."""
    root = tmp_path_factory.mktemp("bench-repo")
    return link_repository(root, exported, {"tiny": {"target": "ort"}})


def test_quick_bench_covers_every_configuration(bench_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mha.cli", "bench", "serve", "--quick",
               "--repository", str(bench_repo), "--model", "tiny", "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    points = document["points"]
    assert {p["config"] for p in points} == {"on", "off", "floor", "inprocess"}
    assert {p["workload"] for p in points} == {"1x16", "1x8-32"}
    for p in points:
        assert p["errors"] == {}, p
        assert p["requests"] > 0 and p["rps"] > 0, p
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"], p
    merged = [p for p in points if p["merge"] == 4]
    assert merged and all(p["config"] == "inprocess" for p in merged)
    on_mix = next(p for p in points if p["config"] == "on" and p["workload"] == "1x8-32")
    assert 0 <= on_mix["padding_fraction"] <= 1 and on_mix["mean_batch"] >= 1
    assert set(document["servers"]) == {"on", "off", "floor"}
    for server in document["servers"].values():
        assert server["startup_s"] > 0 and server["rss_mb"] > 0  # measured, not bounded
    assert {t["target"].split(":")[0] for t in document["targets"]} >= {"1x8-32"}
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    titles = ("end-to-end latency and throughput", "batching on vs off", "serving process")
    for title in (*titles, "targets"):
        assert title in run.stdout


def test_open_loop_against_an_external_server(bench_repo: Path, tmp_path: Path) -> None:
    from mha.bench.servers import start_server

    server = start_server(bench_repo, "off", threads=1, extra=[], log_dir=tmp_path)
    try:
        out = tmp_path / "out"
        command = [sys.executable, "-m", "mha.cli", "bench", "serve", "--url", server.url,
                   "--model", "tiny", "--configs", "external", "--workloads", "1x16",
                   "--rate", "100", "--duration", "0.5", "--warmup", "0.1", "--no-plot",
                   "--out", str(out)]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert server.process.poll() is None  # still serving
    finally:
        assert server.stop() == 0
    assert run.returncode == 0, run.stdout + run.stderr
    [point] = json.loads((out / "bench.json").read_text())["points"]
    assert point["config"] == "external" and point["rate"] == 100 and point["errors"] == {}
    # How many Poisson arrivals fit in 0.5 s depends on the machine's load: only that some
    # were sent and answered is a property of the code.
    assert point["requests"] > 0 and point["p50_ms"] <= point["p99_ms"]
