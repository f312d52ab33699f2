"""`mha infer --compare`: run the same ONNX model locally and check the server's answer.

The tolerance comes from the model's mha.json (parity.atol / parity.rtol, else by dtype:
fp32 atol 1e-5; fp16 atol 1e-3 + rtol 2**-10, one fp16 ulp relative, the export's values).
An element passes when |server - local| <= atol + rtol * |local|, and NaNs must sit at the
same places on both sides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mha import contract

MASK = contract.KEY_PADDING_MASK


class CompareError(ValueError):
    """The comparison cannot run (missing file, unreadable model)."""


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_error: float
    atol: float
    rtol: float
    nan_mismatches: int
    passed: bool


def model_files(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """model.onnx and its mha.json (None when absent) from a file or a version folder."""
    model = path / "model.onnx" if path.is_dir() else path
    if not model.is_file():
        raise CompareError(f"--compare {path}: no ONNX model there (expected model.onnx)")
    config_path = model.parent / "mha.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return model, config


def tolerance(config: Mapping[str, Any] | None) -> tuple[float, float]:
    """(atol, rtol) for the model: its parity record, else the default for its dtype."""
    config = config or {}
    atol, rtol = contract.PARITY_TOLERANCE.get(
        str(config.get("dtype", "FP32")), contract.PARITY_TOLERANCE["FP32"]
    )
    parity = config.get("parity") or {}
    return float(parity.get("atol", atol)), float(parity.get("rtol", rtol))


def run_local(
    model: Path, inputs: Mapping[str, np.ndarray], outputs: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Run the model with ONNX Runtime on CPU; the mask input is all-False when not given."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own types for unreadable models
        raise CompareError(f"--compare {model}: ONNX Runtime cannot load it: {err}") from None
    feeds = {}
    for graph_input in session.get_inputs():
        if graph_input.name in inputs:
            feeds[graph_input.name] = inputs[graph_input.name]
        elif graph_input.name == MASK:
            keys = inputs.get(contract.KEY, inputs[contract.QUERY])
            feeds[MASK] = np.zeros(keys.shape[:2], dtype=bool)
        else:
            raise CompareError(f"--compare {model}: no value for graph input {graph_input.name!r}")
    graph_outputs = {o.name for o in session.get_outputs()}
    missing = [name for name in outputs if name not in graph_outputs]
    if missing:
        raise CompareError(f"--compare {model}: the model has no output {', '.join(missing)}")
    values = session.run(outputs, feeds)
    embedded = session.get_modelmeta().custom_metadata_map.get("mha.config")
    return dict(zip(outputs, values, strict=True)), json.loads(embedded) if embedded else None


def diff(name: str, served: np.ndarray, local: np.ndarray, atol: float, rtol: float) -> OutputDiff:
    """Elementwise check of one output against the local answer."""
    if served.shape != local.shape:
        return OutputDiff(name, float("inf"), atol, rtol, 0, False)
    served64, local64 = served.astype(np.float64), local.astype(np.float64)
    nan_mismatches = int(np.count_nonzero(np.isnan(served64) != np.isnan(local64)))
    both = ~(np.isnan(served64) | np.isnan(local64))
    error = np.abs(served64 - local64)[both]
    allowed = atol + rtol * np.abs(local64[both])
    max_abs = float(error.max()) if error.size else 0.0
    passed = nan_mismatches == 0 and bool(np.all(error <= allowed))
    return OutputDiff(name, max_abs, atol, rtol, nan_mismatches, passed)


def compare(
    path: Path, inputs: Mapping[str, np.ndarray], served: Mapping[str, np.ndarray]
) -> list[OutputDiff]:
    """Run the model at `path` on `inputs` and check every served output against it."""
    model, config = model_files(path)
    local, embedded = run_local(model, inputs, list(served))
    atol, rtol = tolerance(config or embedded)
    return [diff(name, served[name], local[name], atol, rtol) for name in served]
