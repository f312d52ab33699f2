"""Through the wire vs eager PyTorch: every export target, self and cross, masks, typed/raw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from service_helpers import MODELS, RunningServer, random_inputs

from mha.export.options import RTOL, TOLERANCE
from mha.export.validate import reference_module
from mha.model import AttentionConfig, seeded_model
from mha.service.grpc import codec

ATOL_FP32 = 1e-5  # the export's proven fp32 parity


@pytest.fixture(scope="module")
def eager() -> torch.nn.Module:
    """The fp32 eager module with the exports' weights (seeded, seed 0)."""
    return seeded_model(AttentionConfig(d_model=64, num_heads=4)).eval()


def eager_answer(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}
    mask = t.get("key_padding_mask")
    with torch.no_grad():
        out, weights = module(
            t["query"].float(), t.get("key", t["query"]).float(),
            t.get("value", t["query"]).float(), key_padding_mask=mask, need_weights=True,
        )  # fmt: skip
    return {"output": out.numpy(), "attention_weights": weights.numpy()}


FP32_MODELS = [name for name, fields in MODELS.items() if fields.get("dtype") != "fp16"]


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("model", FP32_MODELS)
def test_fp32_answer_equals_eager(running: RunningServer, eager, model, mask, typed):
    inputs = random_inputs(model, batch=3, length=9, source=6, mask=mask, seed=1)
    request = codec.infer_request(model, inputs, typed=typed, request_id=f"{model}-{mask}")
    response = running.stub.ModelInfer(request)
    assert response.id == f"{model}-{mask}"
    assert response.model_name == model and response.model_version == "1"
    answer = codec.response_arrays(response)
    assert list(answer) == ["output"]  # attention weights only when asked for
    np.testing.assert_allclose(answer["output"], eager_answer(eager, inputs)["output"],
                               atol=ATOL_FP32, rtol=0)  # fmt: skip


def test_attention_weights_when_asked(running: RunningServer, eager):
    inputs = random_inputs("cross", batch=2, length=4, source=11, seed=2)
    request = codec.infer_request("cross", inputs, ["attention_weights", "output"])
    answer = codec.response_arrays(running.stub.ModelInfer(request))
    assert list(answer) == ["attention_weights", "output"]  # the order asked for
    expected = eager_answer(eager, inputs)
    assert answer["attention_weights"].shape == (2, 4, 4, 11)
    for name in answer:
        np.testing.assert_allclose(answer[name], expected[name], atol=ATOL_FP32, rtol=0)


def test_fp16_model_travels_raw(running: RunningServer, eager):
    inputs = random_inputs("self_fp16", batch=2, length=6, seed=3, dtype=np.float16)
    response = running.stub.ModelInfer(codec.infer_request("self_fp16", inputs))
    assert response.outputs[0].datatype == "FP16"
    answer = codec.response_arrays(response)["output"]
    assert answer.dtype == np.float16
    # The export's fp16 oracle: fp32 eager on the fp16-rounded weights, the export's tolerance.
    expected = eager_answer(reference_module(eager, "fp16"), inputs)["output"]
    np.testing.assert_allclose(
        answer.astype(np.float32), expected, atol=TOLERANCE["fp16"], rtol=RTOL["fp16"]
    )


def test_fully_padded_sample_gets_zero_rows(running: RunningServer):
    inputs = random_inputs("self", batch=2, length=5, seed=4)
    inputs["key_padding_mask"][1, :] = True
    answer = codec.response_arrays(running.stub.ModelInfer(codec.infer_request("self", inputs)))
    assert np.all(answer["output"][1] == 0) and np.any(answer["output"][0] != 0)
