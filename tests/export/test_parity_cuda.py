"""The same parity gate on ONNX Runtime's CUDA provider (skipped without a GPU).

Written against ORT's documented CUDA provider; not run on the CPU-only development machine.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest

from mha.export import ExportOptions
from mha.export.cases import parity_cases
from mha.export.sources import load_source
from mha.export.validate import check_parity, parity_failures

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("target", ["ort", "onnx", "none"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_cuda_parity(exported, target, dtype, self_attention):
    folder = exported(target=target, dtype=dtype, self_attention=self_attention)
    session = ort.InferenceSession(
        str(folder / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    # ORT falls back to CPU silently when the CUDA provider cannot load: refuse that here.
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    options = ExportOptions(d_model=64, num_heads=4, self_attention=self_attention)
    module = load_source(options, False).module
    results = check_parity(session, module, parity_cases(self_attention), self_attention, dtype)
    assert parity_failures(results) == []
