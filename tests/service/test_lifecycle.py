"""Health through the lifecycle, SIGTERM under load with `mha serve` as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import RunningServer, random_inputs, settings_for

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.grpc import codec

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MHA = str(Path(sys.executable).with_name("mha"))


def health_of(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_loading_serving_draining_stopped(repository: Path):
    server = RunningServer(settings_for(repository))  # started, models not loaded yet
    try:
        channel, stub = server.channel, server.stub
        assert health_of(channel, "liveness") == SERVING
        assert health_of(channel, "") == NOT_SERVING
        assert health_of(channel, "inference.GRPCInferenceService") == NOT_SERVING
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="self")).ready
        request = codec.infer_request("self", random_inputs("self"))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "model 'self' version 1 is not ready (loading)"

        server.load()
        assert health_of(channel, "") == SERVING
        assert stub.ServerReady(pb.ServerReadyRequest()).ready

        server.call(server.server.drain())  # drain_seconds 0: NOT_SERVING, still serving
        assert health_of(channel, "") == NOT_SERVING
        assert health_of(channel, "inference.GRPCInferenceService") == NOT_SERVING
        assert health_of(channel, "liveness") == SERVING
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelInfer(request).outputs[0].name == "output"
    finally:
        server.close()
    fresh = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(fresh).ModelInfer(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    fresh.close()


def start_cli_server(repository: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """`mha serve` on port 0; returns the process and its port once it is SERVING."""
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [MHA, "serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--metrics-port", "off", "--threads", "1", *extra],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no port file within 60 s"
        time.sleep(0.05)
    port = int(port_file.read_text())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        while health_of(channel, "") != SERVING:
            assert time.monotonic() < deadline, "not SERVING within 60 s"
            time.sleep(0.05)
    return process, port


class Client(threading.Thread):
    """Sends requests on its own connection until the server refuses one."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.request = codec.infer_request("self", random_inputs("self", batch=4, length=128))
        self.results: list[tuple[float, grpc.StatusCode]] = []

    def run(self) -> None:
        while True:
            try:
                self.stub.ModelInfer(self.request, timeout=30)
                self.results.append((time.monotonic(), grpc.StatusCode.OK))
            except grpc.RpcError as err:
                self.results.append((time.monotonic(), err.code()))
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    break
        self.channel.close()


@pytest.mark.parametrize("batching", ["--batching", "--no-batching"])
def test_sigterm_under_load_loses_no_accepted_request(repository, tmp_path, batching):
    process, port = start_cli_server(
        repository, tmp_path, "--drain-seconds", "1", "--grace-seconds", "10", batching
    )
    clients = [Client(port) for _ in range(8)]
    for client in clients:
        client.start()
    time.sleep(1.0)
    sigterm_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        while health_of(channel, "") != NOT_SERVING:  # "at once": well within the drain
            assert time.monotonic() - sigterm_at < 0.9
            time.sleep(0.01)
    for client in clients:
        client.join(60)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    results = [r for client in clients for r in client.results]
    codes = {code for _, code in results}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    ok = sum(code == grpc.StatusCode.OK for _, code in results)
    served_in_drain = sum(
        code == grpc.StatusCode.OK and t > sigterm_at + 0.2 for t, code in results
    )
    assert served_in_drain > 0  # the drain window kept serving
    # Every request the server answered reached its client: nothing was dropped.
    answered = re.search(r"stopped: (\d+) requests answered, (\d+) refused", stderr)
    assert answered is not None, stderr
    assert (int(answered[1]), int(answered[2])) == (ok, 0)


def test_serving_process_never_imports_torch(repository: Path):
    script = f"""
import asyncio, sys
from mha.cli import main, build_parser
build_parser("serve")
from mha.service.grpc import codec, server
from mha.service.core import settings
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
import grpc, numpy as np

async def go():
    s = server.Server(settings.Settings(host="127.0.0.1", port=0, metrics_port=0,
                                        repository=__import__("pathlib").Path({str(repository)!r})))
    port = await s.start()
    await s.load_models()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        query = np.zeros((1, 4, 64), np.float32)
        await stub.ModelInfer(codec.infer_request("self", {{"query": query}}))
    await s.stop()

asyncio.run(go())
print(sorted(m for m in sys.modules
             if m == "torch" or m.startswith(("torch.", "mha.model", "mha.export"))))
"""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cuda_asked_without_cuda_fails_clearly(repository: Path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(
        [MHA, "serve", "--repository", str(repository), "--device", "cuda", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--device cuda: ONNX Runtime has no CUDAExecutionProvider" in done.stderr


def test_missing_repository_fails_clearly(tmp_path: Path):
    done = subprocess.run(
        [MHA, "serve", "--repository", str(tmp_path / "nothing"), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"model repository {tmp_path / 'nothing'} is not a folder" in done.stderr


def test_sigterm_while_models_load_exits_cleanly(repository: Path, tmp_path: Path):
    """The port is bound before loading; a SIGTERM then stops the load and exits 0."""
    repo = tmp_path / "many"
    (repo / "self").mkdir(parents=True)
    for version in range(1, 121):  # enough versions that loading takes a while
        (repo / "self" / str(version)).symlink_to((repository / "self" / "1").resolve())
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [MHA, "serve", "--repository", str(repo), "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--metrics-port", "off", "--threads", "1"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    with grpc.insecure_channel(f"127.0.0.1:{int(port_file.read_text())}") as channel:
        assert health_of(channel, "liveness") == SERVING
        loading = health_of(channel, "") == NOT_SERVING
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert loading, "the models were loaded before the test could signal; add versions"
    assert "ready:" not in stderr and "stopped:" in stderr


def test_port_in_use_is_a_clear_error(running: RunningServer, repository: Path):
    done = subprocess.run(
        [MHA, "serve", "--repository", str(repository), "--host", "127.0.0.1",
         "--port", str(running.port), "--metrics-port", "off"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"cannot bind gRPC to 127.0.0.1:{running.port}" in done.stderr
