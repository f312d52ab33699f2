"""`mha export` as a user runs it: real files; the real command in a subprocess for the
round trip and one argument error, mha.cli.main in this process for the rest (tests/commands.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from commands import mha_in_process

from mha.model import AttentionConfig, save, seeded_model
from mha.model.weights import file_sha256

SMALL = ["--d-model", "32", "--num-heads", "4"]
# `mha export ARGS` in this interpreter, then whether it said "nothing to do" and imported torch.
IMPORTS_TORCH = """
import contextlib, io, sys
from mha.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(sys.argv[1:])
print("nothing-to-do" if "nothing to do" in out.getvalue() else "exported")
print(f"torch-imported:{'torch' in sys.modules}")
sys.exit(code)
"""


def mha(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mha.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_export_round_trip_then_if_missing(tmp_path):
    proc = mha(
        "export", "--repository", tmp_path, "--name", "tiny", "--cross", "--kdim", 16, *SMALL
    )
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "tiny" / "1"
    config = json.loads((folder / "mha.json").read_text())
    assert (config["d_model"], config["num_heads"], config["kdim"]) == (32, 4, 16)
    assert config["self_attention"] is False and config["target"] == "ort"
    assert config["parity"]["max_abs_error"]["output"] <= 1e-5
    model = onnx.load(str(folder / "model.onnx"))
    assert json.loads(dict((p.key, p.value) for p in model.metadata_props)["mha.config"]) == config
    assert [i.name for i in model.graph.input] == ["query", "key", "value", "key_padding_mask"]
    assert "B1-L1-S1" in proc.stdout and "[5/5]" in proc.stderr
    before = (folder / "model.onnx").stat().st_mtime_ns
    argv = ["export", "--repository", str(tmp_path), "--name", "tiny", "--if-missing", *SMALL]
    again = subprocess.run([sys.executable, "-c", IMPORTS_TORCH, *argv], capture_output=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout.decode().split() == ["nothing-to-do", "torch-imported:False"]
    assert (folder / "model.onnx").stat().st_mtime_ns == before


def test_export_from_our_safetensors(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save(seeded_model(AttentionConfig(32, 4), seed=7), weights)
    proc = mha_in_process(
        capsys, "export", "--repository", tmp_path, "--weights", weights, "--attention-op", "onnx"
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "mha" / "1" / "mha.json").read_text())
    assert config["weights_source"] == "safetensors:w.safetensors"
    assert config["weights_sha256"] == file_sha256(weights)
    assert (config["d_model"], config["node"], config["opset"]) == (32, "Attention", 23)


def test_export_from_bert_checkpoint(tmp_path, capsys, bert_checkpoint):
    path = tmp_path / "bert" / "model.safetensors"
    path.parent.mkdir()
    bert_checkpoint(path, d_model=32, heads=4, layers=2)
    proc = mha_in_process(
        capsys, "export", "--repository", tmp_path, "--bert", path, "--bert-layer", 1
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "mha" / "1" / "mha.json").read_text())
    assert config["weights_source"] == "bert:model.safetensors#layer1"
    assert (config["d_model"], config["num_heads"]) == (32, 4)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--num-heads", "7"], ["d_model=512 is not divisible by num_heads=7"]),
        (["--attention-op", "bogus"], ["--attention-op", "invalid choice: 'bogus'"]),
        (["--weights", "missing.safetensors"], ["missing.safetensors", "no such file"]),
        (["--weights", "junk.safetensors"], ["junk.safetensors", "not a readable safetensors"]),
        (["--weights", "wrong.safetensors"], ["k_proj.weight has shape (32, 16)"]),
        (["--bert", "junk.safetensors"], ["junk.safetensors"]),
        (["--causal", "--cross"], ["causal"]),
        (["--d-model", "0"], ["d_model"]),
        (
            ["--attention-op", "onnx", "--dtype", "fp16", "--causal", "--attention-weights"],
            ["misses its own fp16 parity", "Use --attention-op ort"],
        ),
    ],
    ids=[
        *("heads", "target", "missing", "junk", "wrong-shape", "bert-junk", "causal-cross", "d0"),
        "onnx-fp16-causal-weights",
    ],
)
def test_bad_arguments_give_one_error_line(tmp_path, capsys, args, needles):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not a safetensors file")
    wrong = seeded_model(AttentionConfig(32, 4, kdim=16))
    save(wrong, tmp_path / "w16.safetensors")
    _rewrite_as_wrong_shape(tmp_path / "w16.safetensors", tmp_path / "wrong.safetensors")
    resolved = [str(tmp_path / a) if a.endswith(".safetensors") else a for a in args]
    proc = mha_in_process(capsys, "export", "--repository", tmp_path / "repo", *resolved)
    assert_one_error_line(proc, *needles)
    assert not (tmp_path / "repo" / "mha").exists()


def test_a_bad_argument_gives_one_error_line_from_the_real_command(tmp_path):
    combination = ["--attention-op", "onnx", "--dtype", "fp16", "--causal", "--attention-weights"]
    proc = mha("export", "--repository", tmp_path / "repo", *combination)
    assert_one_error_line(proc, "misses its own fp16 parity")
    assert not (tmp_path / "repo").exists()


def _rewrite_as_wrong_shape(source: Path, dest: Path) -> None:
    """Our format with a k_proj of (32, 16) but metadata claiming kdim = d_model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        meta = f.metadata()
    config = json.loads(meta["mha.config"])
    config.pop("kdim", None)
    save_file(tensors, str(dest), metadata={"mha.config": json.dumps(config)})
