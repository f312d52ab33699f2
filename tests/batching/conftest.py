"""Fixtures of the batching tests: exported models with real ONNX Runtime sessions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
from batching_helpers import KINDS, Model


@pytest.fixture(scope="session")
def models(exported: Callable[..., Path]) -> Callable[[str], Model]:
    """Model of a kind in KINDS, exported and loaded once per session."""
    cache: dict[str, Model] = {}

    def get(kind: str) -> Model:
        if kind not in cache:
            folder = exported(target="ort", **KINDS[kind])
            config = json.loads((folder / "mha.json").read_text())
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # the tests run jobs concurrently already
            session = ort.InferenceSession(
                str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            cache[kind] = Model(kind, config, session)
        return cache[kind]

    return get
