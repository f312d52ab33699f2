"""Helpers for the service tests: their model set and inputs (the harness: tests/harness.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
from harness import RunningServer, settings_for

__all__ = ["MODELS", "RunningServer", "random_inputs", "settings_for"]

# Model name in the test repository -> ExportOptions fields (d_model 64, 4 heads).
MODELS: dict[str, dict[str, Any]] = {
    "self": {"target": "ort"},
    "cross": {"target": "ort", "self_attention": False, "attention_weights": True},
    "self_onnx": {"target": "onnx"},
    "cross_onnx": {"target": "onnx", "self_attention": False},
    "self_none": {"target": "none"},
    "cross_none": {"target": "none", "self_attention": False},
    "self_fp16": {"target": "ort", "dtype": "fp16"},
}


def random_inputs(
    model: str, batch: int = 2, length: int = 5, source: int = 7, *, seed: int = 0,
    mask: bool = True, dtype: Any = np.float32,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Inputs for a MODELS entry (d_model 64): query, key/value when cross, a padded mask."""
    rng = np.random.default_rng(seed)
    self_attention = MODELS[model].get("self_attention", True)
    keys = length if self_attention else source
    inputs = {"query": rng.standard_normal((batch, length, 64)).astype(dtype)}
    if not self_attention:
        inputs["key"] = rng.standard_normal((batch, source, 64)).astype(dtype)
        inputs["value"] = rng.standard_normal((batch, source, 64)).astype(dtype)
    if mask:
        padding = np.zeros((batch, keys), dtype=bool)
        padding[0, keys - 2 :] = True  # the first sample's last two keys are padding
        inputs["key_padding_mask"] = padding
    return inputs
