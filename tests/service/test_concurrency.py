"""32 concurrent clients, each with its own shapes, all answered correctly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from service_helpers import RunningServer, random_inputs, settings_for

from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.grpc import codec

CLIENTS = 32
REQUESTS_EACH = 4


@pytest.fixture(scope="module", params=["batching", "no-batching"])
def server(request, repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(settings_for(repository, batching=request.param == "batching")).load()
    yield running
    running.close()


async def client(port: int, index: int) -> list[tuple[dict, dict]]:
    """One client on its own channel: requests of varied B, L, S and masks, in sequence."""
    pairs = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for turn in range(REQUESTS_EACH):
            seed = index * REQUESTS_EACH + turn
            model = "cross" if seed % 2 else "self"
            rng = np.random.default_rng(seed)
            batch, length, source = (int(v) for v in rng.integers(1, 24, size=3))
            inputs = random_inputs(model, batch, length, source + 2, seed=seed, mask=seed % 3 > 0)
            request = codec.infer_request(model, inputs, request_id=str(seed))
            response = await stub.ModelInfer(request)
            assert response.id == str(seed)
            pairs.append(({"model": model, **inputs}, codec.response_arrays(response)))
    return pairs


async def all_clients(port: int) -> list[tuple[dict, dict]]:
    results = await asyncio.gather(*(client(port, i) for i in range(CLIENTS)))
    return [pair for result in results for pair in result]


def test_concurrent_clients_get_their_own_answers(server: RunningServer, repository: Path):
    pairs = asyncio.run(all_clients(server.port))
    assert len(pairs) == CLIENTS * REQUESTS_EACH
    sessions = {
        name: ort.InferenceSession(str(repository / name / "1" / "model.onnx"))
        for name in ("self", "cross")
    }
    for sent, answer in pairs:
        model = sent.pop("model")
        feeds = dict(sent)
        if "key_padding_mask" not in feeds:
            keys = feeds["key" if "key" in feeds else "query"]
            feeds["key_padding_mask"] = np.zeros(keys.shape[:2], bool)
        [expected] = sessions[model].run(["output"], feeds)
        np.testing.assert_allclose(answer["output"], expected, atol=1e-5, rtol=0)
