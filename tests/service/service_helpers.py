"""Helpers for the service tests: the real grpc.aio server on port 0, in a background loop.

The server runs in its own thread with its own event loop, so tests talk to it through
ordinary (sync) gRPC channels, as any client would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core.scheduling import Runner
from mha.service.core.settings import Settings
from mha.service.grpc.server import Server

T = TypeVar("T")

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


class RunningServer:
    """A Server running in a thread's event loop; `call` runs a coroutine there."""

    def __init__(
        self, settings: Settings, wrap_runner: Callable[[Runner], Runner] | None = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(settings, wrap_runner=wrap_runner)
        self.port = self.call(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def load(self) -> RunningServer:
        self.call(self.server.load_models())
        return self

    def close(self) -> None:
        self.channel.close()
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def settings_for(repository: Path, **overrides: Any) -> Settings:
    """Test settings: port 0, no metrics endpoint, 2 threads, no batching by default."""
    base = Settings(
        host="127.0.0.1", port=0, metrics_port=None, repository=repository, device="cpu",
        threads=2, batching=False, grace_seconds=5,
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)


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
