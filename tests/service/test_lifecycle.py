"""Health through the lifecycle, SIGTERM under load with `mha serve` as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from service_helpers import (
    MHA,
    NOT_SERVING,
    SERVING,
    WAIT_SECONDS,
    RunningServer,
    health_of,
    random_inputs,
    settings_for,
    start_cli_server,
    wait_for,
    wait_port,
)

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.grpc import codec


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


class Client(threading.Thread):
    """Sends requests on its own connection until the server refuses one."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.request = codec.infer_request("self", random_inputs("self", batch=4, length=128))
        self.codes: list[grpc.StatusCode] = []
        self.answered = threading.Event()  # set at the first OK

    def run(self) -> None:
        while True:
            try:
                self.stub.ModelInfer(self.request, timeout=WAIT_SECONDS)
                self.codes.append(grpc.StatusCode.OK)
                self.answered.set()
            except grpc.RpcError as err:
                self.codes.append(err.code())
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    break
        self.channel.close()


@pytest.mark.parametrize("batching", ["--batching", "--no-batching"])
def test_sigterm_under_load_loses_no_accepted_request(repository, tmp_path, batching):
    """Readiness turns NOT_SERVING while requests are still served; nothing accepted is lost.

    The order of events is what is checked: NOT_SERVING is seen first, and a request sent
    after that is still answered (the drain window, long enough for one request on a loaded
    machine), then every client ends on UNAVAILABLE and the server's count of answered
    requests equals the clients' count of OKs.
    """
    process, port = start_cli_server(
        repository, tmp_path, "--drain-seconds", "5", "--grace-seconds", "30", batching
    )
    clients = [Client(port) for _ in range(8)]
    for client in clients:
        client.start()
    for client in clients:  # load on every connection before the signal
        assert client.answered.wait(WAIT_SECONDS)
    process.send_signal(signal.SIGTERM)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_for(lambda: health_of(channel, "") == NOT_SERVING, "NOT_SERVING", process)
        late = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            codec.infer_request("self", random_inputs("self")), timeout=WAIT_SECONDS
        )
    assert late.outputs[0].name == "output"  # served after readiness went NOT_SERVING
    for client in clients:
        client.join(WAIT_SECONDS)
    _, stderr = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == 0, stderr
    codes = [code for client in clients for code in client.codes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert all(client.codes[-1] == grpc.StatusCode.UNAVAILABLE for client in clients)
    ok = codes.count(grpc.StatusCode.OK) + 1  # + the late request
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


HELD_LOAD_SCRIPT = """
import asyncio, sys
from pathlib import Path
from mha.service.core import logs, settings
from mha.service.grpc import server

repository, port_file, gate = (Path(a) for a in sys.argv[1:4])
options = settings.Settings(host="127.0.0.1", port=0, port_file=port_file, metrics_port=None,
                            repository=repository, threads=1)
logs.configure()
held = server.Server(options, before_load=lambda spec: gate.read_text())  # a FIFO: blocks
asyncio.run(server.serve(options, held))
"""


def test_sigterm_while_models_load_exits_cleanly(repository: Path, tmp_path: Path):
    """The port is bound before loading; a SIGTERM then stops the load and exits 0.

    The serving loop runs in a process of its own whose first model load waits on a FIFO,
    so the signal surely arrives while loading: the test opens the FIFO only after the
    server logged the signal.
    """
    gate, port_file = tmp_path / "gate", tmp_path / "port"
    os.mkfifo(gate)
    process = subprocess.Popen(
        [sys.executable, "-c", HELD_LOAD_SCRIPT, str(repository), str(port_file), str(gate)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    port = wait_port(port_file, process)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert health_of(channel, "liveness") == SERVING
        assert health_of(channel, "") == NOT_SERVING  # the first load waits on the gate
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    seen = []  # the log up to the loop's "signal received": the load is cancelled by then
    while not seen or "signal received" not in seen[-1]:
        line = process.stderr.readline()
        assert line, "the server's log ended before it logged the signal: " + "".join(seen)
        seen.append(line)
    gate.write_text("go")  # frees the loading thread (the load it was in finishes, unused)
    _, rest = process.communicate(timeout=WAIT_SECONDS)
    stderr = "".join(seen) + rest
    assert process.returncode == 0, stderr
    assert "stopped:" in stderr and "ready:" not in stderr


def test_port_in_use_is_a_clear_error(running: RunningServer, repository: Path):
    done = subprocess.run(
        [MHA, "serve", "--repository", str(repository), "--host", "127.0.0.1",
         "--port", str(running.port), "--metrics-port", "off"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"cannot bind gRPC to 127.0.0.1:{running.port}" in done.stderr
