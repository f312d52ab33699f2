"""`mha bench export` in --quick mode: every contestant and case, fp32 parity, JSON and PNG.

Not a timed test: it checks what the benchmark reports, never how fast anything ran.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mha.errors import CliError
from mha.export import TOLERANCE, bench
from mha.export.bench_contestants import Case
from mha.export.bench_plot import (
    OURS,
    TORCH,
    add_speedups,
    check_targets,
    ort_name,
    target_lines,
)

CONTESTANTS = {TORCH, OURS, ort_name("ort"), ort_name("onnx"), ort_name("none")}
QUICK_CASES = ["B1-L8", "B1-L8-padded", "B2-L16", "B2-L16-padded"]


def run_bench(*argv: str) -> tuple[int, str, str]:
    """Run `mha bench export ARGV` in-process; exit status, stdout, stderr."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = bench.run(args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick run (d_model 64, 4 heads, 3 timed runs) kept for every test below."""
    root = tmp_path_factory.mktemp("bench")
    threads_before = torch.get_num_threads()
    status, stdout, stderr = run_bench(
        "--quick", "--d-model", "64", "--num-heads", "4", "--repeats", "3",
        "--out", str(root / "out"), "--repository", str(root / "repo"),
    )  # fmt: skip
    report = json.loads((root / "out" / "bench-export.json").read_text())
    return {
        "root": root,
        "status": status,
        "stdout": stdout,
        "stderr": stderr,
        "report": report,
        "threads_before": threads_before,
        "threads_after": torch.get_num_threads(),
    }


def test_every_contestant_and_case_is_reported(quick):
    report = quick["report"]
    assert quick["status"] == 0
    assert set(report["contestants"]) == CONTESTANTS
    assert report["cases"] == QUICK_CASES
    got = {(r["case"], r["contestant"]) for r in report["results"]}
    assert got == {(c, n) for c in QUICK_CASES for n in CONTESTANTS}
    one_thread = report["settings"]["torch"]["num_threads"] == 1
    for row in report["results"]:
        assert row["runs"] == 3
        assert (row["cpu_median_ms"] is not None) == one_thread
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["speedup_vs_torch"] > 0 and row["speedup_vs_none"] > 0


def test_outputs_match_our_eager_module_in_fp32(quick):
    for row in quick["report"]["results"]:
        assert row["max_abs_error"] <= TOLERANCE["fp32"], row
        if row["contestant"] == OURS:
            assert row["max_abs_error"] == 0.0


def test_table_targets_and_png_are_written(quick):
    stdout, root = quick["stdout"], quick["root"]
    for case in QUICK_CASES:
        assert f"| {case}" in stdout
    # quick shapes carry no vs-torch target; `never slower than none` applies to every case
    checks = quick["report"]["targets"]
    assert [(c["case"], c["check"]) for c in checks] == [(c, "ort vs none") for c in QUICK_CASES]
    assert stdout.count("ort vs none") == len(QUICK_CASES)
    png = root / "out" / "bench-export.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = quick["report"]["settings"]
    assert settings["ort_session"]["intra_op_num_threads"] == settings["torch"]["num_threads"]


def test_torch_threads_are_restored(quick):
    assert quick["threads_after"] == quick["threads_before"]


def test_repository_exports_are_reused_and_one_thread_reports_cpu_time(quick):
    repo = quick["root"] / "repo"
    models = sorted(repo.glob("bench-*/1/model.onnx"))
    assert len(models) == 3
    stamps = [m.stat().st_mtime_ns for m in models]
    out = quick["root"] / "again"
    status, _, stderr = run_bench(
        "--d-model", "64", "--num-heads", "4", "--shapes", "1x4", "--repeats", "1",
        "--warmup", "0", "--threads", "1", "--out", str(out), "--repository", str(repo),
    )  # fmt: skip
    assert status == 0
    assert stderr.count("reusing") == 3 and "exporting" not in stderr
    assert [m.stat().st_mtime_ns for m in models] == stamps
    report = json.loads((out / "bench-export.json").read_text())
    assert report["cases"] == ["B1-L4", "B1-L4-padded"]
    # on one thread every contestant also reports its CPU time per call
    assert all(r["cpu_median_ms"] > 0 and r["cpu_speedup_vs_torch"] > 0 for r in report["results"])
    assert all(c["cpu_speedup"] > 0 for c in report["targets"])
    assert report["settings"]["ort_session"]["intra_op_num_threads"] == 1


def test_padded_case_pads_the_last_quarter_of_every_sample():
    query, mask = Case(2, 16, padded=True).inputs(8)
    assert query.shape == (2, 16, 8) and query.dtype.name == "float32"
    assert mask is not None and mask[:, 12:].all() and not mask[:, :12].any()
    assert Case(2, 16, padded=False).inputs(8)[1] is None


def row(case: str, contestant: str, ms: float, b: int = 1, length: int = 16) -> dict:
    return {
        "case": case,
        "contestant": contestant,
        "median_ms": ms,
        "B": b,
        "L": length,
        "other_processes_cores": 1.5,
    }


def test_targets_pass_and_miss():
    rows = [
        row("B1-L16", TORCH, 3.0),
        row("B1-L16", ort_name("ort"), 2.0),  # 1.5x torch: exactly the target
        row("B1-L16", ort_name("none"), 1.9),  # ort slower than none: a miss
    ]
    add_speedups(rows)
    checks = {c["check"]: c for c in check_targets(rows)}
    assert (
        checks["ort vs torch nn.MHA"]["pass"] and checks["ort vs torch nn.MHA"]["required"] == 1.5
    )
    assert not checks["ort vs none"]["pass"]
    assert checks["ort vs none"]["speedup"] == pytest.approx(0.95)
    lines = target_lines(list(checks.values())).splitlines()
    assert lines[0].startswith("PASS  ort vs torch nn.MHA") and lines[1].startswith("MISS")
    assert all("contended: other processes kept 1.50 cores busy" in line for line in lines)


@pytest.mark.parametrize("bad", ["8by128", "0x16", "1x2", "1x16x3"])
def test_bad_shapes_are_one_line_errors(bad):
    with pytest.raises(CliError, match="--shapes"):
        bench.parse_shapes([bad], quick=False)


def test_command_line_lists_the_flags():
    done = subprocess.run(
        [sys.executable, "-m", "mha.cli", "bench", "export", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--out", "--repeats", "--quick", "--shapes", "--threads", "--repository"):
        assert flag in done.stdout
