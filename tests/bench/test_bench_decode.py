"""Smoke test of `mha bench decode --quick`: every contestant and workload runs and reports.

Not a timed test: it checks the benchmark works on the session's exports of its two models,
not how fast decoding is; the targets' verdicts are not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import no_bench_folders
from test_bench_cli import SCRIPT

QUICK_POINTS = {  # (contestant, prompt, sequences) of --quick
    ("in-process", 8, 1),
    ("cached", 8, 1),
    ("cached", 8, 4),
    ("recompute", 8, 1),
    ("batching-off", 8, 1),
    ("batching-off", 8, 4),
    ("echo", 8, 1),
    ("echo", 8, 4),
}
TABLES = (
    "decode figures", "KV cache vs recompute", "continuous batching on vs off",
    "gRPC step vs the protocol floor and the in-process ceiling", "same answers", "targets",
    "decoding while long prompts arrive",
)  # fmt: skip


def decode(repository: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`mha bench decode --quick` with its own TMPDIR, so what it leaves there is seen."""
    command = [sys.executable, "-m", "mha.cli", "bench", "decode", "--quick",
               "--repository", str(repository), "--out", str(out), *extra]  # fmt: skip
    (out.parent / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(out.parent / "tmp")}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_quick_decode_bench_covers_every_contestant(decode_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = decode(decode_repo, out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert no_bench_folders(tmp_path / "tmp") == []  # the servers' port files went with them
    assert {p.name for p in (out / "logs").iterdir()} == {
        "server-on.log", "server-off.log", "server-echo.log",
    }  # fmt: skip
    document = json.loads((out / "bench.json").read_text())
    points = document["points"]
    assert {(p["contestant"], p["prompt"], p["sequences"]) for p in points} == QUICK_POINTS
    for p in points:
        assert p["tokens"] == 4 * p["sequences"] and p["tokens_per_s"] > 0, p
        assert p["refused"] == 0, p  # nothing is squeezed here
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"], p
        if p["server"] not in (None, "echo"):  # the echo has no /metrics
            assert p["mean_batch"] >= 1, p
        if p["contestant"] in ("cached", "batching-off"):  # read while the sequences lived
            assert p["cache_bytes"] >= p["cache_rows_bytes"] > 0, p
    for agreement in document["agreement"]:  # two exports of the same weights
        assert agreement["max_abs_diff"] <= 1e-4, agreement
    assert {a["pair"] for a in document["agreement"]} == {
        "cached vs recompute", "cached vs batching-off", "cached vs in-process",
    }  # fmt: skip
    mixed = document["mixed"]  # 8 sequences stepping while two prompts arrive, on and off
    assert [m["contestant"] for m in mixed] == ["cached", "batching-off"]
    for m in mixed:
        assert m["steps_during"] > 0 and m["steps_without"] > 0, m
        assert m["steps_during"] + m["steps_without"] == 8 * 4 and m["refused"] == 0, m
        assert 0 < m["during_p50_ms"] <= m["during_p99_ms"] and m["prefill_p50_ms"] > 0, m
    # cache vs recompute (1), on vs off tokens/s and p99 (2 x 2), cache bytes (2), mixed (2),
    # then the floor's: x1 p50 and share of bound, x4 share (3)
    targets = document["targets"]
    assert len(targets) == 12 and all(math.isfinite(t["value"]) for t in targets), targets
    assert all(t["value"] > 0 for t in targets if "bound" in t["target"]), targets
    assert len(document["machine"]["loadavg_before"]) == 3
    assert set(document["servers"]) == {"on", "off", "echo"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    for title in TABLES:
        assert title in run.stdout


def test_decode_help_loads_no_export_tools() -> None:
    argv = ["bench", "decode", "--help"]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    heavy, _ = done.stdout.rsplit(" ", 1)
    assert heavy == "[]", done.stdout


def test_repeats_interleave_and_refusals_are_sent_again(decode_repo: Path, tmp_path: Path) -> None:
    """Both servers up at once; each repeat runs every workload for every contender in turn,
    starting one contender later each repeat. And UNAVAILABLE from admission is sent again:
    with every run in the executor (so requests overlap) and a 1 us queue-delay limit, the
    four sequences' overlapping prefills and steps are refused, sent again and counted."""
    out = tmp_path / "out"
    run = decode(decode_repo, out, "--repeats", "2", "--contestants", "cached,batching-off",
                 "--server-arg=--inline-runs-under-us=0",
                 "--server-arg=--max-queue-delay-ms=0.001", "--no-plot")  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    order = document["order"]
    assert [run["contestant"] for run in order] == [
        "cached", "batching-off", "cached", "batching-off",
        "batching-off", "cached", "batching-off", "cached",
    ]  # fmt: skip
    workloads = [run["workload"] for run in order]
    assert workloads[0] == workloads[1] != workloads[2] == workloads[3]
    assert workloads[4:] == workloads[:4]
    assert [run["repeat"] for run in order] == [0] * 4 + [1] * 4
    points = document["points"]
    assert all(p["tokens"] == 4 * 2 * p["sequences"] for p in points), points
    assert sum(p["refused"] for p in points) > 0, points
