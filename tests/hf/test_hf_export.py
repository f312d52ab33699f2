"""`mha export --hf` stateless exports on ONNX Runtime against the Hugging Face model itself,
and the command's refusals.

GPT-2's layer 1 (its scale folded into W^Q) on a padded batch in fp32; Whisper's layer 1
encoder-decoder attention in fp16 over the encoder's output of audio frames, padded with
masked rows it must ignore. The transformers model sees fp16-valued weights and attention
inputs there (a pre-hook rounds them), so fp16 is held to the contract's tolerance.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hf_models import attention_module, capture, model_inputs

from mha import contract
from mha.export.exporter import cpu_session


def session(model_dir) -> ort.InferenceSession:
    return cpu_session(str(model_dir / "model.onnx"))


def assert_within(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    """|got - want| <= atol + rtol |want| elementwise (mha.contract.PARITY_TOLERANCE)."""
    atol, rtol = contract.PARITY_TOLERANCE[dtype]
    diff = np.abs(got.astype(np.float64) - want)
    assert (diff <= atol + rtol * np.abs(want)).all(), f"max abs error {diff.max():.3g}"
    return float(diff.max())


def test_gpt2_layer_on_a_padded_batch_matches_transformers(tiny_models, hf_exported):
    folder, model = tiny_models["gpt2"]
    model_dir = hf_exported("gpt2-self", "--hf", folder, "--hf-layer", 1)
    inputs, mask, _ = model_inputs("gpt2", [7, 3, 5], [4, 4, 4], seed=11)
    captured = capture(model, "gpt2", attention_module(model, "gpt2", "decoder", 1, "self"),
                       **inputs)  # fmt: skip
    feeds = {contract.QUERY: captured.query, contract.KEY_PADDING_MASK: ~mask.numpy()}
    (got,) = session(model_dir).run([contract.OUTPUT], feeds)
    rows = mask.numpy()
    assert_within(got[rows], captured.output[rows], "FP32")
    config = json.loads((model_dir / "mha.json").read_text())
    assert config["causal"] is True and config["source"]["layer"] == 1
    assert config["weights_source"] == "hf:gpt2 decoder layer 1 self-attention"


def fp16_valued(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose weights are fp16 values (as the fp16 export stores them), in fp32."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in twin.parameters():
            param.copy_(param.half().float())
    return twin


def round_inputs(_module, args, kwargs):
    """Forward pre-hook: the attention's inputs rounded to fp16 values, as ORT gets them."""
    kwargs = dict(kwargs)
    for name in ("hidden_states", "key_value_states"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].half().float()
    args = tuple(a.half().float() if torch.is_tensor(a) else a for a in args)
    return args, kwargs


def test_whisper_cross_layer_fp16_over_a_padded_memory(tiny_models, hf_exported):
    folder, model = tiny_models["whisper"]
    model_dir = hf_exported(
        "whisper-cross16", "--hf", folder, "--hf-layer", 1, "--hf-attention", "cross",
        "--dtype", "fp16", "--attention-op", "onnx",
    )  # fmt: skip
    twin = fp16_valued(model)
    inputs, mask, _ = model_inputs("whisper", [4, 6], [], seed=5)
    hf_module = attention_module(twin, "whisper", "decoder", 1, "cross")
    handle = hf_module.register_forward_pre_hook(round_inputs, with_kwargs=True)
    try:
        captured = capture(twin, "whisper", hf_module, **inputs)
    finally:
        handle.remove()
    memory = captured.memory.astype(np.float16)  # (B, S, E) encoder output
    padding = np.random.default_rng(2).standard_normal((2, 3, memory.shape[2]))
    padded = np.concatenate([memory, padding.astype(np.float16)], axis=1)  # 3 rows to ignore
    key_padding_mask = np.zeros(padded.shape[:2], bool)
    key_padding_mask[:, memory.shape[1] :] = True
    feeds = {
        contract.QUERY: captured.query.astype(np.float16),
        contract.KEY: padded,
        contract.VALUE: padded,
        contract.KEY_PADDING_MASK: key_padding_mask,
    }
    (got,) = session(model_dir).run([contract.OUTPUT], feeds)
    assert got.dtype == np.float16
    rows = mask.numpy()
    assert_within(got[rows], captured.output[rows], "FP16")


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--hf-layer", "7"], ["layer 7 is out of range", "has 2 layers"]),
        (["--hf-attention", "cross", "--hf-stack", "encoder"], ["encoder layers have no cross"]),
        (["--num-heads", "2"], ["--hf reads sizes", "drop --num-heads"]),
        (["--cross"], ["use --hf-attention cross"]),
        (["--hf-stack", "encoder", "--kv-cache"], ["--kv-cache decodes causal", "bidirectional"]),
    ],
    ids=["layer", "encoder-cross", "heads", "cross-flag", "encoder-kv"],
)
def test_refusals_are_one_error_line(tiny_models, tmp_path, capsys, flags, needles):
    from mha.cli import main

    folder, _ = tiny_models["marian"]
    status = main(["export", "--repository", str(tmp_path), "--hf", str(folder), *flags])
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if not line.startswith("[1/5]")]
    assert len(lines) == 1 and lines[0].startswith("mha export: error: "), err
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in err and not (tmp_path / "mha").exists()


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_torchvision_notices_are_dropped_and_nothing_else():
    from mha.export.cli import require_export_extra
    from mha.export.quiet import REGISTRY_LOGGER

    require_export_extra("mha export")
    registry, kept = logging.getLogger(REGISTRY_LOGGER), Kept()
    level = registry.level
    registry.setLevel(logging.WARNING)  # as after `import torch` in `mha export`
    registry.addHandler(kept)
    try:
        registry.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        registry.warning("something else about %s", "torchvision::nms")
    finally:
        registry.removeHandler(kept)
        registry.setLevel(level)
    assert kept.messages == ["something else about torchvision::nms"]
