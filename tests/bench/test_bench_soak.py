"""`mha bench soak`: the trend and the verdict on given samples, and short real runs.

The real runs drive a real `mha serve`: one as it is (it passes, memory judged on a bound
a healthy few-second run keeps), one with a leak injected into the same server
(mha.bench.framework.leak: it holds 40 MB more each second), which the verdict must catch,
and one whose requests all fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import no_bench_folders
from harness import link_repository
from test_bench_cli import SCRIPT

from mha.bench.framework.mix import roles_in
from mha.bench.framework.trend import theil_sen
from mha.bench.scenarios import soak as soak_report


@pytest.fixture(scope="module")
def soak_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stateless and a KV-cache self-attention model, d_model 64, 4 heads."""
    root = tmp_path_factory.mktemp("soak-repo")
    models = {"tiny": {"target": "ort"}, "tiny-kv": {"target": "ort", "kv_cache": True}}
    return link_repository(root, exported, models)


def samples(*rss: float, warmup: int = 0, failures: int = 0) -> list[dict]:
    """Interval records with these VmRSS samples, one a second; the first `warmup` are the
    warm-up."""
    return [
        {"rss_mb": r, "warmup": i < warmup, "p99_ms": 10.0 + i, "end_s": float(i + 1),
         "refused": 0, "failures": {"UNAVAILABLE": failures} if i == 1 and failures else {}}
        for i, r in enumerate(rss)
    ]  # fmt: skip


def test_theil_sen_finds_a_line_through_outliers() -> None:
    t = np.arange(20.0)
    y = 100 + 2 * t
    y[[3, 11, 17]] = [400, -50, 900]  # three wild samples
    trend = theil_sen(t, y)
    assert trend is not None and trend.slope == pytest.approx(2.0)
    assert trend.low <= 2.0 <= trend.high and trend.level(0) == pytest.approx(100)
    assert theil_sen([0.0, 1.0], [1.0, 2.0]) is None  # too few samples for a trend


def test_a_plateau_that_swings_passes_where_its_last_samples_are_high() -> None:
    """The samples of a flat plateau swing +-10%; the last few happen to be high, so the ends'
    medians would read +6% and fail a 5% bound. The trend over the whole run reads flat."""
    swings = [100, 110, 91, 104, 96, 109, 90, 103, 98, 108, 92, 101, 97, 106, 93, 100,
              95, 107, 92, 104, 106, 107, 104]  # fmt: skip
    found = soak_report.verdict(samples(300, *swings, warmup=1), 0.05)
    assert found["ok"] and found["reasons"] == []
    assert abs(found["rss"]["growth"]) < 0.05 and found["rss"]["growth_low"] < 0


def test_steady_growth_past_the_bound_fails() -> None:
    found = soak_report.verdict(samples(100, 100, 101, 103, 105, 108, 110, 112), 0.05)
    assert not found["ok"] and "VmRSS grew" in found["reasons"][0]
    assert found["rss"]["growth"] > 0.05 and found["rss"]["growth_low"] > 0


def test_any_failed_request_fails() -> None:
    found = soak_report.verdict(samples(100, 100, 100, 100, warmup=1, failures=2), 0.05)
    assert not found["ok"] and found["reasons"] == ["2 requests failed"]


def test_few_samples_judge_every_sample_and_no_samples_judge_nothing() -> None:
    short = soak_report.verdict(samples(100, 120, 140, warmup=2), 0.05)
    assert not short["ok"] and "before three samples after the warm-up" in short["rss"]["note"]
    unknown = soak_report.verdict(samples(None, None), 0.05)  # type: ignore[arg-type]
    assert unknown["ok"] and unknown["rss"]["growth"] is None


def test_p99_drift_compares_the_last_interval_with_the_first_after_warm_up() -> None:
    drift = soak_report.p99_drift(samples(1, 1, 1, 1, warmup=1))
    assert drift == {"first_ms": 11.0, "last_ms": 13.0, "ratio": 13.0 / 11.0}


def test_roles_follow_each_models_mha_json(soak_repo: Path) -> None:
    assert [(r.model, r.kind, r.width) for r in roles_in(soak_repo)] == [
        ("tiny", "self", 64), ("tiny-kv", "decode", 64),
    ]  # fmt: skip


def soak(repo: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A few seconds of soak, with its own TMPDIR, so what it leaves there is seen."""
    command = [sys.executable, "-m", "mha.cli", "bench", "soak", "--repository", str(repo),
               "--no-export", "--minutes", "0.1", "--interval", "0.25", "--warmup-seconds", "1",
               "--concurrency", "2", "--threads", "1", "--max-rss-growth", "0.5", "--out",
               str(out), *extra]  # fmt: skip
    (out.parent / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(out.parent / "tmp")}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def test_short_soak_drives_every_model_and_passes(soak_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = soak(soak_repo, out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert no_bench_folders(tmp_path / "tmp") == []
    document = json.loads((out / "bench.json").read_text())
    intervals = document["intervals"]
    assert len(intervals) >= 10 and sum(i["requests"] for i in intervals) > 0
    assert all(i["rss_mb"] > 0 and i["end_s"] > i["start_s"] for i in intervals)
    assert {r["kind"] for r in document["roles"]} == {"self", "decode"}
    assert set(document["kinds"]) == {"self", "decode"}
    verdict = document["verdict"]
    assert verdict["ok"] and verdict["failures"] == 0 and verdict["rss"]["samples"] >= 3
    assert verdict["rss"]["growth"] < 0.5  # no leak: the server's memory levels off
    assert document["failure_details"] == {}
    assert len(document["machine"]["loadavg_before"]) == 3
    markdown = (out / "bench.md").read_text()
    for title in ("## VmRSS and latency over time", "## summary", "load average", "Theil-Sen"):
        assert title in markdown and title in run.stdout


def test_a_leak_in_the_server_fails_the_soak(soak_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = soak(soak_repo, out, "--leak-mb-per-s", "40")
    assert run.returncode == 1, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    verdict = document["verdict"]
    assert not verdict["ok"] and verdict["failures"] == 0, verdict
    assert verdict["rss"]["growth_low"] > 0.5 and verdict["rss"]["slope_mb_per_min"] > 0
    assert document["server"]["leak_mb_per_s"] == 40
    assert "VmRSS grew" in run.stderr


def test_soak_exits_1_when_requests_fail(soak_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A deadline no request can meet: every answer is DEADLINE_EXCEEDED.
    run = soak(soak_repo, out, "--requests", "40", "--timeout", "0.000001")
    assert run.returncode == 1, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    # A few may still come back OK: the answer can win the race with the client's timer.
    assert not document["verdict"]["ok"] and document["verdict"]["failures"] > 0
    assert sum(i["requests"] for i in document["intervals"]) >= 40
    assert all(text.startswith("DEADLINE_EXCEEDED") for text in document["failure_details"])
    assert "requests failed" in run.stderr


def test_soak_help_loads_no_export_tools() -> None:
    argv = [sys.executable, "-c", SCRIPT, "bench", "soak", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("[] "), done.stdout + done.stderr
