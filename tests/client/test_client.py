"""The Python client API against a real server: every RPC, sync and async, and its errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from mha.client import AsyncClient, Client, ClientError
from mha.service.grpc import codec


def inputs_for(model: str, batch: int = 2, length: int = 5, source: int = 7, seed: int = 0):
    """query (and key/value for the cross model) and a mask padding the last 2 keys."""
    rng = np.random.default_rng(seed)
    keys = length if model == "self" else source
    arrays = {"query": rng.standard_normal((batch, length, 64), dtype=np.float32)}
    if model == "cross":
        arrays["key"] = rng.standard_normal((batch, keys, 64), dtype=np.float32)
        arrays["value"] = rng.standard_normal((batch, keys, 64), dtype=np.float32)
    mask = np.zeros((batch, keys), dtype=bool)
    mask[:, -2:] = True
    arrays["key_padding_mask"] = mask
    return arrays


def local(repo: Path, model: str, arrays: dict, outputs: list[str]) -> dict[str, np.ndarray]:
    """The same ONNX file run here with ONNX Runtime."""
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    return dict(zip(outputs, session.run(outputs, arrays), strict=True))


def test_health_and_metadata_rpcs(server_url: str) -> None:
    with Client(server_url, timeout=10) as client:
        assert client.live() and client.ready()
        assert client.model_ready("self") and client.model_ready("cross", "1")
        with pytest.raises(ClientError) as err:
            client.model_ready("self", "9")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert client.health("") == "SERVING"
        assert client.health("liveness") == "SERVING"
        assert client.health("inference.GRPCInferenceService") == "SERVING"
        assert client.server_metadata().name
        meta = client.model_metadata("cross")
        assert meta.name == "cross" and "1" in meta.versions
        assert [t.name for t in meta.inputs][:3] == ["query", "key", "value"]
        assert list(meta.inputs[0].shape) == [-1, -1, 64]
        assert {t.name for t in meta.outputs} == {"output", "attention_weights"}


@pytest.mark.parametrize("model", ["self", "cross"])
@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_infer_matches_local_onnxruntime(
    server_url: str, client_repo: Path, model: str, typed: bool
) -> None:
    arrays = inputs_for(model)
    with Client(server_url) as client:
        result = client.infer(model, arrays, request_id=f"{model}-1", typed=typed)
    assert result.id == f"{model}-1" and result.model_name == model
    assert result.model_version == "1" and result.latency_s > 0
    assert list(result.outputs) == ["output"]  # weights only when asked
    expected = local(client_repo, model, arrays, ["output"])["output"]
    assert result.outputs["output"].shape == (2, 5, 64)
    np.testing.assert_allclose(result.outputs["output"], expected, rtol=0, atol=1e-5)


def test_requested_outputs_and_omitted_mask(server_url: str, client_repo: Path) -> None:
    arrays = inputs_for("cross", batch=1, length=3, source=4)
    del arrays["key_padding_mask"]  # optional: nothing padded
    with Client(server_url) as client:
        result = client.infer("cross", arrays, ["attention_weights"], version="1")
    assert list(result.outputs) == ["attention_weights"]
    weights = result.outputs["attention_weights"]
    assert weights.shape == (1, 4, 3, 4)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
    full = {**arrays, "key_padding_mask": np.zeros((1, 4), dtype=bool)}
    expected = local(client_repo, "cross", full, ["attention_weights"])["attention_weights"]
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-5)


def test_statistics_count_requests(server_url: str) -> None:
    with Client(server_url) as client:
        before = client.statistics("self").model_stats[0].inference_count
        for seed in range(3):
            client.infer("self", inputs_for("self", batch=2, seed=seed))
        stats = client.statistics("self", "1").model_stats
    assert [s.name for s in stats] == ["self"]
    assert stats[0].inference_count == before + 6  # samples, B=2 each


def test_errors_carry_code_and_details(server_url: str) -> None:
    with Client(server_url) as client:
        with pytest.raises(ClientError) as err:
            client.infer("nope", inputs_for("self"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert "nope" in err.value.details
        assert str(err.value) == f"NOT_FOUND: {err.value.details}"
        bad = {"query": np.zeros((1, 3, 32), dtype=np.float32)}
        with pytest.raises(ClientError) as err:
            client.infer("self", bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "query" in err.value.details and "64" in err.value.details
        with pytest.raises(ClientError) as err:
            client.model_metadata("self", "7")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError) as err:
            client.health("no.such.Service")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        # the server keeps serving after refusals
        assert client.infer("self", inputs_for("self")).outputs["output"].shape == (2, 5, 64)


def test_message_limit_and_unreachable_server(server_url: str) -> None:
    big = {"query": np.zeros((4, 64, 64), dtype=np.float32)}  # 64 KiB of raw contents
    with (
        Client(server_url, max_message_bytes=16 << 10) as client,
        pytest.raises(ClientError) as err,
    ):
        client.infer("self", big)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(ClientError) as err:
        client.live()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_typed_fp16_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="FP16"):
        codec.infer_request("m", {"query": np.zeros((1, 2, 4), np.float16)}, typed=True)


def test_async_client_concurrent_requests(server_url: str, client_repo: Path) -> None:
    requests = [inputs_for("self", batch=1, length=4 + i, seed=i) for i in range(8)]

    async def main():
        async with AsyncClient(server_url) as client:
            assert await client.live() and await client.ready()
            assert await client.model_ready("self")
            assert await client.health() == "SERVING"
            assert (await client.model_metadata("self")).name == "self"
            assert (await client.server_metadata()).name
            results = await asyncio.gather(
                *(client.infer("self", r, request_id=str(i)) for i, r in enumerate(requests))
            )
            with pytest.raises(ClientError) as err:
                await client.infer("nope", requests[0])
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            stats = await client.statistics("self")
            return results, stats

    results, stats = asyncio.run(main())
    assert stats.model_stats[0].inference_count >= 8
    for i, (arrays, result) in enumerate(zip(requests, results, strict=True)):
        assert result.id == str(i)
        expected = local(client_repo, "self", arrays, ["output"])["output"]
        np.testing.assert_allclose(result.outputs["output"], expected, rtol=0, atol=1e-5)
