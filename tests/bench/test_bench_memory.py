"""Smoke test of `mha bench memory --quick`: both contestants and every workload run and report.

Not a timed test: it checks the benchmark works on the session's exports of its two models,
not how fast a held memory is; the speed target's verdict is not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from test_bench_cli import SCRIPT

QUICK_POINTS = {  # (contestant, S, sequences) of --quick
    ("cached", 8, 1),
    ("cached", 8, 4),
    ("resend", 8, 1),
    ("resend", 8, 4),
}
TABLES = ("memory figures", "held memory vs resending it", "same answers", "targets")


def test_quick_memory_bench_covers_every_contestant(memory_repo: Path, tmp_path: Path) -> None:
    """Every contender and workload, with admission squeezed: every run in the executor (so
    requests overlap) and a 1 us queue-delay limit, so overlapping steps are refused with
    UNAVAILABLE; the run sends them again and counts them instead of ending."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mha.cli", "bench", "memory", "--quick",
               "--repository", str(memory_repo), "--out", str(out),
               "--server-arg=--inline-runs-under-us=0",
               "--server-arg=--max-queue-delay-ms=0.001"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "UNAVAILABLE" not in run.stderr
    document = json.loads((out / "bench.json").read_text())
    points = document["points"]
    assert {(p["contestant"], p["memory"], p["sequences"]) for p in points} == QUICK_POINTS
    for p in points:
        assert p["tokens"] == 4 * p["sequences"] and p["tokens_per_s"] > 0, p
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"], p
        assert p["mean_batch"] >= 1, p
        if p["contestant"] == "cached":  # read while the sequences lived
            assert p["cache_bytes"] >= p["memory_rows_bytes"] > 0, p
            assert p["request_bytes_first"] > p["request_bytes_later"], p
        else:
            assert p["request_bytes_first"] == p["request_bytes_later"], p
    by_point = {(p["contestant"], p["memory"], p["sequences"]): p for p in points}
    for (contestant, memory, sequences), cached in by_point.items():
        if contestant == "cached":
            resend = by_point[("resend", memory, sequences)]
            assert cached["request_bytes_per_step"] < resend["request_bytes_per_step"]
    assert sum(p["refused"] for p in points) > 0, points
    agreement = document["agreement"]
    assert {(a["memory"], a["sequences"]) for a in agreement} == {(8, 1), (8, 4)}
    assert all(a["max_abs_diff"] <= 1e-4 for a in agreement), agreement  # same weights
    assert [t["target"].split(":")[0] for t in document["targets"]] == ["S=8 x4", "answers agree"]
    assert document["targets"][0]["value"] > 0
    assert len(document["machine"]["loadavg_before"]) == 3
    assert len(document["machine"]["loadavg_after"]) == 3
    assert set(document["servers"]) == {"on"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    for title in TABLES:
        assert title in run.stdout


def test_memory_help_loads_no_export_tools() -> None:
    argv = [sys.executable, "-c", SCRIPT, "bench", "memory", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("[] "), done.stdout + done.stderr
