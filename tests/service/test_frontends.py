"""`mha serve --frontends 2`: real processes on a real port, one engine behind them.

Which frontend answers a connection is the kernel's choice (SO_REUSEPORT), so each
frontend names itself in ServerMetadata (`frontend:<index>/<pid>`) and the tests open
channels, each its own connection, until they have one to every frontend. Two servers per
module: `served` (plaintext, a drain at the end) and `secured` (TLS and tokens, its engine
killed at the end).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from certs import Pki
from harness import link_repository
from sequence_helpers import FullForward, check_steps, chunks
from service_helpers import (
    MHA,
    NOT_SERVING,
    SERVING,
    WAIT_SECONDS,
    RunningServer,
    health_of,
    random_inputs,
    settings_for,
    wait_for,
    wait_port,
)

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.grpc import codec

MODELS = {"self": {"target": "ort"}, "cross": {"target": "ort", "self_attention": False,
          "attention_weights": True}, "kv": {"target": "ort", "kv_cache": True}}  # fmt: skip
TOKEN = "frontend-token"
IDENTITY = re.compile(r"frontend:(\d+)/(\d+)")


@dataclass
class Cluster:
    """A running `mha serve --frontends 2` and how to reach it."""

    process: subprocess.Popen
    port: int
    metrics_port: int
    target: str
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def channel(self) -> grpc.Channel:
        # A connection of its own: channels to one target share one by default.
        options = [("grpc.use_local_subchannel_pool", 1)]
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options)
        return grpc.secure_channel(self.target, self.credentials, options)

    def identity(self, channel: grpc.Channel) -> tuple[int, int]:
        """(index, pid) of the frontend on the other end of the channel."""
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=self.metadata,
                                     timeout=WAIT_SECONDS)  # fmt: skip
        found = [IDENTITY.fullmatch(e) for e in answer.extensions]
        match = next(m for m in found if m)
        return int(match[1]), int(match[2])

    def reach(self, count: int = 2) -> dict[int, tuple[grpc.Channel, int]]:
        """index -> (a channel to that frontend, its pid), for as many frontends as 64
        connections reach (they never all land on one of two but with odds of 2^-63)."""
        found: dict[int, tuple[grpc.Channel, int]] = {}
        for _ in range(64):
            channel = self.channel()
            index, pid = self.identity(channel)
            if index in found:
                channel.close()
            else:
                found[index] = (channel, pid)
            if len(found) == count:
                break
        return found

    def every_frontend(self, count: int = 2) -> dict[int, tuple[grpc.Channel, int]]:
        found = self.reach(count)
        assert len(found) == count, f"connections reached only frontends {sorted(found)}"
        return found

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as answer:
            return str(answer.read().decode())


def start_cluster(repository: Path, folder: Path, *extra: str, **reach: object) -> Cluster:
    folder.mkdir(parents=True, exist_ok=True)
    port_file, metrics_file = folder / "port", folder / "metrics-port"
    process = subprocess.Popen(
        [MHA, "serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--metrics-port", "0", "--metrics-port-file",
         str(metrics_file), "--threads", "1", "--frontends", "2", "--no-batching", *extra],
        stderr=(folder / "log").open("w"),
    )  # fmt: skip
    port = wait_port(port_file, process)
    cluster = Cluster(process, port, int(metrics_file.read_text()), f"127.0.0.1:{port}", **reach)  # type: ignore[arg-type]
    with cluster.channel() as channel:  # readiness: the engine and every frontend are up
        wait_for(lambda: health_of(channel, "") == SERVING, "SERVING", process)
    return cluster


def stop(cluster: Cluster) -> None:
    if cluster.process.poll() is None:
        cluster.process.send_signal(signal.SIGTERM)
        cluster.process.wait(WAIT_SECONDS)


@pytest.fixture(scope="module")
def repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_repository(tmp_path_factory.mktemp("frontends-repo"), exported, MODELS)


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(repo, tmp_path_factory.mktemp("served"), "--drain-seconds", "1")
    yield cluster
    stop(cluster)


@pytest.fixture(scope="module")
def single(repo: Path) -> Iterator[RunningServer]:
    server = RunningServer(settings_for(repo, threads=1)).load()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("frontends-pki"))


@pytest.fixture(scope="module")
def secured(repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("secured")
    pair, tokens = pki.issue("server", server=True), folder / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    cluster = start_cluster(
        repo, folder, "--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key),
        "--auth-token-file", str(tokens), credentials=credentials,
        metadata=(("authorization", f"Bearer {TOKEN}"),),
    )  # fmt: skip
    yield cluster
    stop(cluster)


def infer(channel: grpc.Channel, request: pb.ModelInferRequest, metadata=()) -> Any:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return stub.ModelInfer(request, metadata=metadata, timeout=WAIT_SECONDS)


def refusal(call: Callable[..., object], *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    """The code and details of the refusal call(*args, **kwargs) must end in."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code(), caught.value.details()


REQUESTS = {
    "self-padded": codec.infer_request("self", random_inputs("self")),
    "self-typed": codec.infer_request("self", random_inputs("self", 1, 3, mask=False), typed=True),
    "cross-weights": codec.infer_request("cross", random_inputs("cross", 3, 4, 6),
                                         outputs=("output", "attention_weights")),
}  # fmt: skip


def test_answers_equal_the_single_process_servers(served: Cluster, single: RunningServer):
    for index, (channel, _) in sorted(served.every_frontend().items()):
        for name, request in REQUESTS.items():
            want, got = single.stub.ModelInfer(request), infer(channel, request)
            assert got.raw_output_contents == want.raw_output_contents, (index, name)
            assert [o.shape for o in got.outputs] == [o.shape for o in want.outputs]
            assert dict(got.parameters) == dict(want.parameters)


def test_bad_requests_keep_their_status_codes_through_every_frontend(
    served: Cluster, single: RunningServer
):
    nan = random_inputs("self", 1, 3, mask=False)
    nan["query"][0, 1, 2] = np.nan
    bad = {
        "wrong-width": codec.infer_request("self", {"query": np.ones((1, 3, 65), np.float32)}),
        "unknown-model": codec.infer_request("nope", random_inputs("self")),
        "nan": codec.infer_request("self", nan),
        "no-sequence-id": codec.infer_request("kv", {"query": np.ones((1, 2, 64), np.float32)}),
    }  # fmt: skip
    garbage = "/inference.GRPCInferenceService/ModelInfer"
    for channel, _ in served.every_frontend().values():
        for name, request in bad.items():
            got = refusal(infer, channel, request)
            assert got == refusal(single.stub.ModelInfer, request), name
            assert got[0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        raw = channel.unary_unary(garbage)
        code, _ = refusal(raw, b"\xff\xff\xff", timeout=WAIT_SECONDS)
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def step_request(query: np.ndarray, sequence_id: str, start: bool, end: bool):
    parameters = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}
    return codec.infer_request("kv", {"query": query}, parameters=parameters)


def test_a_sequence_steps_through_both_frontends_in_order(served: Cluster, repo: Path):
    frontends = served.every_frontend()
    sent = chunks(np.random.default_rng(2), [4, 1, 2, 1, 1, 3])
    answers = []
    for step, query in enumerate(sent):  # alternating frontends, one cache in the engine
        channel, _ = frontends[step % 2]
        answer = infer(channel, step_request(query, "across", step == 0, step == len(sent) - 1))
        rows = np.frombuffer(answer.raw_output_contents[0], np.float32)
        answers.append(rows.reshape(query.shape))
    check_steps(FullForward(repo / "kv" / "1"), sent, answers)


class OpenStream:
    """A ModelStreamInfer call that sends `first`, then stays open until `end()`."""

    def __init__(self, channel: grpc.Channel, first: pb.ModelInferRequest) -> None:
        self.gate = threading.Event()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.answers = stub.ModelStreamInfer(self.requests(first), timeout=WAIT_SECONDS)

    def requests(self, first: pb.ModelInferRequest) -> Iterator[pb.ModelInferRequest]:
        yield first
        self.gate.wait(WAIT_SECONDS)

    def end(self) -> list[Any]:
        """Half-close; the answers left once the server has ended the stream."""
        self.gate.set()
        return list(self.answers)


def test_a_streams_sequences_end_with_it_seen_from_the_other_frontend(served: Cluster):
    frontends = served.every_frontend()
    query = chunks(np.random.default_rng(3), [2])[0]
    stream = OpenStream(frontends[0][0], step_request(query, "streamed", True, False))
    assert next(stream.answers).error_message == ""
    assert stream.end() == []  # the stream ended, its sequence with it
    request = step_request(query, "streamed", False, False)
    code, details = refusal(infer, frontends[1][0], request)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "ended with the stream it ran on" in details


def test_statistics_and_metrics_count_every_frontend(served: Cluster):
    def successes() -> float:
        line = next(
            line for line in served.metrics().splitlines()
            if line.startswith('mha_requests_total{model="self",outcome="success"')
        )  # fmt: skip
        return float(line.rsplit(" ", 1)[1])

    frontends = served.every_frontend()
    before, request = successes(), REQUESTS["self-padded"]
    for channel, _ in frontends.values():
        for _ in range(3):
            infer(channel, request)
    assert successes() - before == 6
    counts = []
    for channel, _ in frontends.values():
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="self"), timeout=WAIT_SECONDS)
        counts.append(stats.model_stats[0].inference_stats.success.count)
    assert counts[0] == counts[1] >= 6  # one engine's figures, whichever frontend asks


def test_tls_and_tokens_in_every_frontend_and_token_files_reload(secured: Cluster, tmp_path):
    frontends = secured.every_frontend()
    request = REQUESTS["self-padded"]
    for channel, _ in frontends.values():
        assert infer(channel, request, secured.metadata).raw_output_contents
        code, _ = refusal(infer, channel, request)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    tokens = Path(secured.process.args[secured.process.args.index("--auth-token-file") + 1])
    fresh = tmp_path / "tokens"
    fresh.write_text("rotated-token\n")
    os.replace(fresh, tokens)
    rotated = (("authorization", "Bearer rotated-token"),)
    for channel, _ in frontends.values():  # each frontend reads the file on its own
        assert infer(channel, request, rotated).raw_output_contents
        code, _ = refusal(infer, channel, request, secured.metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    secured.metadata = rotated


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_engine_stops_every_frontend_and_the_server_fails(secured: Cluster):
    frontends = secured.every_frontend()
    pids = {pid for _, pid in frontends.values()}
    (engine,) = set(children(secured.process.pid)) - pids
    os.kill(engine, signal.SIGKILL)
    assert secured.process.wait(WAIT_SECONDS) != 0  # the pod restarts
    for channel, _ in frontends.values():
        code, _ = refusal(infer, channel, REQUESTS["self-padded"], secured.metadata)
        assert code == grpc.StatusCode.UNAVAILABLE


def test_a_killed_frontend_fails_its_calls_and_comes_back(served: Cluster):
    frontends = served.every_frontend()
    (victim, pid), (survivor, _) = frontends[0], frontends[1]
    stream = OpenStream(victim, REQUESTS["self-padded"])
    assert next(stream.answers).infer_response.raw_output_contents  # in flight, open
    os.kill(pid, signal.SIGKILL)
    code, _ = refusal(next, stream.answers)
    assert code == grpc.StatusCode.UNAVAILABLE  # the connection dropped: no hang
    stream.gate.set()
    assert infer(survivor, REQUESTS["self-padded"]).raw_output_contents  # others serve on

    def back() -> bool:  # restarted: a new pid, and readiness (every frontend up) again
        found = served.reach()
        return 0 in found and found[0][1] != pid and health_of(found[0][0], "") == SERVING

    wait_for(back, "frontend 0 back", served.process)


def test_sigterm_drains_every_frontend_then_exits_cleanly(served: Cluster):
    frontends = served.every_frontend()
    served.process.send_signal(signal.SIGTERM)
    for channel, _ in frontends.values():  # NOT_SERVING at once, still answering
        wait_for(lambda c=channel: health_of(c, "") == NOT_SERVING, "NOT_SERVING")
        assert infer(channel, REQUESTS["self-padded"]).raw_output_contents
    assert served.process.wait(WAIT_SECONDS) == 0
