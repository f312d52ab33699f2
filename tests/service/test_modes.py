"""The --no-compute floor, JSON logs, and the CUDA paths (skipped without a GPU)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from harness import link_repository
from service_helpers import RunningServer, random_inputs, settings_for

from mha.client import Client, SequenceStep
from mha.model import AttentionConfig, seeded_model
from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.core import logs
from mha.service.core.repository import scan
from mha.service.core.runtime import SessionRunner
from mha.service.grpc import codec


def test_no_compute_answers_zeros_of_the_right_shapes(repository: Path):
    server = RunningServer(settings_for(repository, no_compute=True)).load()
    try:
        inputs = random_inputs("cross", batch=3, length=4, source=9)
        request = codec.infer_request("cross", inputs, ["output", "attention_weights"])
        answer = codec.response_arrays(server.stub.ModelInfer(request))
        assert answer["output"].shape == (3, 4, 64) and answer["output"].dtype == np.float32
        assert answer["attention_weights"].shape == (3, 4, 4, 9)
        assert not answer["output"].any() and not answer["attention_weights"].any()
        fp16 = random_inputs("self_fp16", dtype=np.float16)
        response = server.stub.ModelInfer(codec.infer_request("self_fp16", fp16))
        assert response.outputs[0].datatype == "FP16"
        inputs["query"] = inputs["query"][:, :, :8]  # still validated
        with pytest.raises(grpc.RpcError) as caught:
            server.stub.ModelInfer(codec.infer_request("cross", inputs))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.close()


def test_no_compute_decodes_a_sequence_in_zeros(
    exported: Callable[..., Path], tmp_path: Path
) -> None:
    """A KV-cache model's prompt and steps answer zeros of their own lengths, the cache
    growing by each request's rows as it would with compute."""
    repository = link_repository(tmp_path, exported, {"kv": {"target": "ort", "kv_cache": True}})
    server = RunningServer(settings_for(repository, no_compute=True)).load()
    try:
        rng, rows = np.random.default_rng(0), 0
        with Client(server.url) as client:
            for count, step in ((8, SequenceStep(3, start=True)), (1, SequenceStep(3)),
                                (2, SequenceStep(3, end=True))):  # fmt: skip
                query = rng.standard_normal((1, count, 64)).astype(np.float32)
                answer = client.infer("kv", {"query": query}, sequence=step).outputs["output"]
                assert answer.shape == (1, count, 64) and not answer.any()
                rows += count
                held = server.server.plane.sequences.active.get(("kv", 1, 3))
                if step.end:
                    assert held is None  # ended with its last request
                else:
                    assert held is not None and held.length == rows
    finally:
        server.close()


def test_json_logs_carry_the_request_id(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("INFO", "json")
        token = logs.request_id.set("req-9")
        logging.getLogger("mha.test").info("hello %s", "there")
        logs.request_id.reset(token)
        logging.getLogger("mha.test").warning("outside")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["request_id"], e["message"], e["level"]) for e in lines] == [
        ("req-9", "hello there", "INFO"),
        ("-", "outside", "WARNING"),
    ]


@pytest.mark.cuda
def test_cuda_serving_matches_eager_through_io_binding(repository: Path):
    """On a GPU: CUDA provider in use, IO binding runner, fp32 parity (TF32 off) at 1e-5."""
    server = RunningServer(settings_for(repository, device="cuda")).load()
    try:
        served = server.server.plane.table.get("cross")
        assert served.loaded.provider == "CUDAExecutionProvider"
        assert served.loaded.runner.io_binding  # type: ignore[attr-defined]
        metadata = server.stub.ServerMetadata(pb.ServerMetadataRequest())
        assert "device:CUDAExecutionProvider" in metadata.extensions
        inputs = random_inputs("cross", batch=3, length=17, source=33, seed=5)
        request = codec.infer_request("cross", inputs, ["output", "attention_weights"])
        response = server.stub.ModelInfer(request)
        assert response.parameters["provider"].string_param == "CUDAExecutionProvider"
        answer = codec.response_arrays(response)
        module = seeded_model(AttentionConfig(d_model=64, num_heads=4)).eval()
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            mask = t["key_padding_mask"]
            out, weights = module(
                t["query"], t["key"], t["value"], key_padding_mask=mask, need_weights=True
            )
        np.testing.assert_allclose(answer["output"], out.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(answer["attention_weights"], weights.numpy(), atol=1e-5, rtol=0)
    finally:
        server.close()


def test_io_binding_runner_equals_session_run(repository: Path):
    """The IO binding code path (CUDA's) run on CPU gives session.run's answer exactly."""
    spec = scan(repository)["cross"][1]
    session = ort.InferenceSession(str(spec.model_file), providers=["CPUExecutionProvider"])
    plain = SessionRunner(session, "CPUExecutionProvider")
    bound = SessionRunner(session, "CPUExecutionProvider", bind="cpu")
    assert bound.io_binding and not plain.io_binding
    feeds = random_inputs("cross", batch=2, length=5, source=8, seed=3)
    outputs = ("attention_weights", "output")
    expected, got = plain(feeds, outputs), bound(feeds, outputs)
    assert list(got) == list(outputs)
    for name in outputs:
        np.testing.assert_array_equal(got[name], expected[name])
