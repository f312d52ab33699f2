"""`mha bench soak`: the verdict on given samples, and two short runs against a real server.

Not a timed test: the end-to-end runs check that the soak drives every model kind it finds
and reports, and that a failing request makes it exit 1; whether memory grew in a few
seconds is only judged by the verdict tests, on samples made up here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import link_repository
from test_bench_cli import SCRIPT

from mha.bench import soak_report
from mha.bench.soak_load import roles_in


@pytest.fixture(scope="module")
def soak_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stateless and a KV-cache self-attention model, d_model 64, 4 heads."""
    root = tmp_path_factory.mktemp("soak-repo")
    models = {"tiny": {"target": "ort"}, "tiny-kv": {"target": "ort", "kv_cache": True}}
    return link_repository(root, exported, models)


def samples(*rss: float, warmup: int = 0, failures: int = 0) -> list[dict]:
    """Interval records with these VmRSS samples; the first `warmup` are the warm-up."""
    return [
        {"rss_mb": r, "warmup": i < warmup, "p99_ms": 10.0 + i,
         "failures": {"UNAVAILABLE": failures} if i == 1 and failures else {}}
        for i, r in enumerate(rss)
    ]  # fmt: skip


def test_flat_memory_and_no_failures_pass() -> None:
    found = soak_report.verdict(samples(300, 100, 101, 99, 100, 102, 100, 101, warmup=1), 0.05)
    assert found["ok"] and found["reasons"] == []
    assert found["rss"]["baseline_mb"] == 100 and found["rss"]["last_mb"] == 101  # medians


def test_growth_past_the_bound_fails() -> None:
    found = soak_report.verdict(samples(100, 100, 101, 103, 105, 108, 110, 112), 0.05)
    assert not found["ok"] and "VmRSS grew" in found["reasons"][0]
    assert found["rss"]["growth"] == pytest.approx(110 / 100 - 1)


def test_any_failed_request_fails() -> None:
    found = soak_report.verdict(samples(100, 100, 100, warmup=1, failures=2), 0.05)
    assert not found["ok"] and found["reasons"] == ["2 requests failed"]


def test_few_samples_judge_first_to_last_and_no_samples_judge_nothing() -> None:
    short = soak_report.verdict(samples(100, 120, warmup=2), 0.05)
    assert not short["ok"] and "before two samples after the warm-up" in short["rss"]["note"]
    unknown = soak_report.verdict(samples(None, None), 0.05)  # type: ignore[arg-type]
    assert unknown["ok"] and unknown["rss"]["growth"] is None


def test_p99_drift_compares_the_last_interval_with_the_first_after_warm_up() -> None:
    drift = soak_report.p99_drift(samples(1, 1, 1, 1, warmup=1))
    assert drift == {"first_ms": 11.0, "last_ms": 13.0, "ratio": 13.0 / 11.0}


def test_roles_follow_each_models_mha_json(soak_repo: Path) -> None:
    assert [(r.model, r.kind, r.width) for r in roles_in(soak_repo)] == [
        ("tiny", "self", 64), ("tiny-kv", "decode", 64),
    ]  # fmt: skip


def soak_command(repo: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mha.cli", "bench", "soak", "--repository", str(repo),
            "--no-export", "--minutes", "0.2", "--interval", "0.5", "--warmup-seconds", "0.5",
            "--concurrency", "2", "--threads", "1", "--out", str(out), *extra]  # fmt: skip


def test_short_soak_drives_every_model_and_reports(soak_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # An RSS bound no few-second run can break: the verdict's memory logic is tested above.
    command = soak_command(soak_repo, out, "--requests", "300", "--max-rss-growth", "100",
                           "--warmup-seconds", "0")  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads((out / "bench.json").read_text())
    intervals = document["intervals"]
    assert intervals and sum(i["requests"] for i in intervals) >= 300
    assert all(i["rss_mb"] > 0 and i["end_s"] > i["start_s"] for i in intervals)
    assert {r["kind"] for r in document["roles"]} == {"self", "decode"}
    assert set(document["kinds"]) == {"self", "decode"}
    assert document["verdict"]["ok"] and document["verdict"]["failures"] == 0
    assert document["failure_details"] == {}
    assert len(document["machine"]["loadavg_before"]) == 3
    markdown = (out / "bench.md").read_text()
    for title in ("## VmRSS and latency over time", "## summary", "load average"):
        assert title in markdown and title in run.stdout


def test_soak_exits_1_when_requests_fail(soak_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A deadline no request can meet: every answer is DEADLINE_EXCEEDED.
    command = soak_command(soak_repo, out, "--requests", "40", "--timeout", "0.000001")
    run = subprocess.run(command, capture_output=True, text=True, timeout=180)
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
