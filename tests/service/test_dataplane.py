"""The data plane used directly, with no transport: same answers, typed refusals, statistics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from service_helpers import random_inputs, settings_for

from mha.service.core.dataplane import DataPlane
from mha.service.core.errors import InvalidArgument, NotFound, ResourceExhausted, Status
from mha.service.core.inference import InferRequest, InputTensor
from mha.service.core.stats import Statistics, StatsMetrics


@pytest.fixture(scope="module")
def plane(repository: Path) -> Iterator[tuple[DataPlane, asyncio.AbstractEventLoop]]:
    """A loaded data plane (no batching) and the event loop it lives in."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(2)
    settings = settings_for(repository, max_batch_size=4)
    data_plane = DataPlane.create(settings, executor, StatsMetrics(Statistics()))
    loop.run_until_complete(data_plane.load_all())
    yield data_plane, loop
    loop.run_until_complete(data_plane.close())
    executor.shutdown()
    loop.close()


def local(repository: Path, model: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(
        str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["output"], inputs)[0]


@pytest.mark.parametrize("model", ["self", "cross"])
def test_infer_from_arrays_equals_onnxruntime(plane, repository: Path, model: str) -> None:
    data_plane, loop = plane
    inputs = random_inputs(model, batch=2, length=5, source=7, seed=3)
    response = loop.run_until_complete(
        data_plane.infer(InferRequest.from_arrays(model, inputs, id="r1"))
    )
    assert (response.model_name, response.model_version, response.id) == (model, "1", "r1")
    assert list(response.outputs) == ["output"]
    np.testing.assert_array_equal(response.outputs["output"], local(repository, model, inputs))
    assert response.parameters["provider"] == "CPUExecutionProvider"
    assert response.batch_size == 2 and response.compute_ns > 0


def test_raw_bytes_and_typed_values_decode_like_arrays(plane) -> None:
    data_plane, loop = plane
    query = random_inputs("self", mask=False)["query"]
    shape = tuple(query.shape)
    as_bytes = InputTensor("query", "FP32", shape, query.tobytes())
    as_values = InputTensor("query", "FP32", shape, query.ravel().tolist(), "fp32_contents")
    answers = [
        loop.run_until_complete(data_plane.infer(InferRequest("self", inputs=[tensor])))
        for tensor in (as_bytes, as_values, InputTensor.from_array("query", query))
    ]
    for answer in answers[1:]:
        np.testing.assert_array_equal(answer.outputs["output"], answers[0].outputs["output"])


def test_refusals_are_typed_with_their_status(plane) -> None:
    data_plane, loop = plane
    query = np.zeros((1, 3, 64), np.float32)

    def refusal(request: InferRequest) -> Exception:
        with pytest.raises(Exception) as caught:
            loop.run_until_complete(data_plane.infer(request))
        return caught.value

    missing = refusal(InferRequest.from_arrays("nope", {"query": query}))
    assert isinstance(missing, NotFound) and missing.code is Status.NOT_FOUND
    wrong = refusal(InferRequest.from_arrays("self", {"query": query[..., :32]}))
    assert isinstance(wrong, InvalidArgument) and "expected 64 (d_model)" in wrong.message
    big = refusal(InferRequest.from_arrays("self", {"query": np.zeros((5, 3, 64), np.float32)}))
    assert isinstance(big, ResourceExhausted) and "over the limit of 4" in big.message
    short = refusal(InferRequest("self", inputs=[InputTensor("query", "FP32", (1, 3, 64), b"x")]))
    assert isinstance(short, InvalidArgument) and "raw contents are 1 bytes" in short.message


def test_statistics_count_what_the_plane_answered(plane) -> None:
    data_plane, loop = plane
    before = {s.name: st.success.count for s, st in data_plane.statistics("self_none")}
    inputs = random_inputs("self_none")
    for _ in range(3):
        loop.run_until_complete(data_plane.infer(InferRequest.from_arrays("self_none", inputs)))
    [(_, stats)] = data_plane.statistics("self_none")
    assert stats.success.count == before["self_none"] + 3
    assert stats.inference_count >= 3 * inputs["query"].shape[0]
