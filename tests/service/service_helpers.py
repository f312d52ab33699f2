"""Helpers for the service tests: their model set and inputs (the harness: tests/harness.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import RunningServer, settings_for

__all__ = [
    "MHA", "MODELS", "NOT_SERVING", "SERVING", "WAIT_SECONDS", "RunningServer", "health_of",
    "random_inputs", "settings_for", "start_cli_server", "wait_for", "wait_port",
]  # fmt: skip

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


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MHA = str(Path(sys.executable).with_name("mha"))


def health_of(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


# Generous: these wait for processes on a shared, possibly loaded machine; a wait that
# ends earlier never makes a test pass that should fail.
WAIT_SECONDS = 120


def wait_for(condition, what: str, process: subprocess.Popen | None = None) -> None:
    """Poll until the condition holds (the process, if given, must stay alive)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before {what}")
        assert time.monotonic() < deadline, f"not {what} within {WAIT_SECONDS} s"
        time.sleep(0.01)


def wait_port(port_file: Path, process: subprocess.Popen) -> int:
    wait_for(lambda: port_file.exists(), "a port file", process)
    return int(port_file.read_text())


def start_cli_server(
    repository: Path, tmp_path: Path, *extra: str, name: str = "port"
) -> tuple[subprocess.Popen, int]:
    """`mha serve` on port 0; returns the process and its port once it is SERVING (its port
    file is tmp_path / name: one name per server of a test)."""
    port_file = tmp_path / name
    process = subprocess.Popen(
        [MHA, "serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--metrics-port", "off", "--threads", "1", *extra],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    port = wait_port(port_file, process)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_for(lambda: health_of(channel, "") == SERVING, "SERVING", process)
    return process, port
