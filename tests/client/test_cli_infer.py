"""`mha infer` as a user runs it: a subprocess against a real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def mha_infer(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mha.cli", "infer", "--url", url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_compare_passes_with_mask_and_typed(server_url: str, client_repo: Path) -> None:
    run = mha_infer(
        server_url,
        "--model",
        "self",
        "-b",
        "3",
        "-l",
        "11",
        "--padded",
        "4",
        "--typed",
        "--id",
        "cli-1",
        "--compare",
        str(client_repo / "self" / "1"),
    )
    assert run.returncode == 0, run.stderr
    assert "id 'cli-1'" in run.stdout
    assert "key_padding_mask   BOOL [3, 11]" in run.stdout
    assert "output             FP32 [3, 11, 64]" in run.stdout
    assert "NaN 0" in run.stdout and "latency" in run.stdout
    assert "compare output: max abs error" in run.stdout and ": ok" in run.stdout


def test_cross_attention_source_length_and_model_file(server_url: str, client_repo: Path) -> None:
    model_file = client_repo / "cross" / "1" / "model.onnx"
    run = mha_infer(
        server_url,
        "--model",
        "cross",
        "-b",
        "2",
        "-l",
        "5",
        "-s",
        "9",
        "--attention-weights",
        "--compare",
        str(model_file),
    )
    assert run.returncode == 0, run.stderr
    assert "key                FP32 [2, 9, 64]" in run.stdout
    assert "attention_weights  FP32 [2, 4, 5, 9]" in run.stdout
    assert run.stdout.count(": ok") == 2


def test_npy_inputs(server_url: str, tmp_path: Path) -> None:
    query = np.random.default_rng(3).standard_normal((2, 6, 64)).astype(np.float32)
    mask = np.zeros((2, 6), dtype=bool)
    mask[1] = True  # a fully padded sample answers zero rows
    np.save(tmp_path / "q.npy", query)
    np.save(tmp_path / "m.npy", mask)
    run = mha_infer(
        server_url,
        "--model",
        "self",
        "--query",
        str(tmp_path / "q.npy"),
        "--mask",
        str(tmp_path / "m.npy"),
    )
    assert run.returncode == 0, run.stderr
    assert "query              FP32 [2, 6, 64]" in run.stdout
    assert "output             FP32 [2, 6, 64]" in run.stdout


def test_compare_fails_on_a_different_model(
    server_url: str, client_repo: Path, tmp_path: Path
) -> None:
    shutil.copy(client_repo / "self" / "1" / "mha.json", tmp_path / "mha.json")
    model = onnx.load(str(client_repo / "self" / "1" / "model.onnx"))
    weight = next(i for i in model.graph.initializer if len(i.dims) == 2)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    run = mha_infer(server_url, "--model", "self", "--compare", str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "compare output: max abs error" in run.stdout and "FAIL" in run.stdout


def test_unknown_model_is_one_line_error(server_url: str) -> None:
    run = mha_infer(server_url, "--model", "nope")
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mha infer: error: NOT_FOUND: ") and "nope" in lines[0]


def test_bad_input_is_one_line_server_error(server_url: str, tmp_path: Path) -> None:
    np.save(tmp_path / "q.npy", np.zeros((1, 4, 32), dtype=np.float32))
    run = mha_infer(server_url, "--model", "self", "--query", str(tmp_path / "q.npy"))
    assert run.returncode != 0 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mha infer: error: INVALID_ARGUMENT: ")


def test_plot_writes_png(server_url: str, tmp_path: Path) -> None:
    png = tmp_path / "weights.png"
    run = mha_infer(server_url, "--model", "cross", "-l", "6", "-s", "10", "--plot", str(png))
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_needs_attention_weights(server_url: str, tmp_path: Path) -> None:
    run = mha_infer(server_url, "--model", "self", "--plot", str(tmp_path / "w.png"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "has no attention_weights output" in run.stderr
    assert not (tmp_path / "w.png").exists()
