"""TLS, mTLS, bearer tokens and the plaintext health port, with real certificates and sockets.

Certificates come from tests/certs.py (a CA made per test module); every check is a real
handshake on a real port. Reloads swap files under a live server and are seen by the next
handshake (certificates) or the next call (tokens): the tests open a new channel, or call
again, after the swap; no waiting on time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from certs import Pair, Pki, stray_key
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_helpers import RunningServer, random_inputs, settings_for

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core.errors import StartupError
from mha.service.core.settings import Settings
from mha.service.grpc import codec
from mha.service.grpc.guard import MISSING_TOKEN, WRONG_TOKEN
from mha.service.grpc.server import Server

TOKEN = "token-one-7f3a"
GOOD = [("authorization", f"Bearer {TOKEN}")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_pair(pki: Pki) -> Pair:
    return pki.issue("server", server=True)


@pytest.fixture(scope="module")
def client_pair(pki: Pki) -> Pair:
    return pki.issue("client", server=False)


def _start(settings: Settings) -> RunningServer:
    return RunningServer(settings).load()


def _tls_channel(port: int, ca: Path, client: Pair | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


def _live(channel: grpc.Channel, metadata: Any = None) -> bool:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerLive(pb.ServerLiveRequest(), metadata=metadata, timeout=30).live)


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


@pytest.fixture(scope="module")
def tls_server(repository: Path, server_pair: Pair, tmp_path_factory) -> Iterator[RunningServer]:
    """TLS and tokens on, a health port: what the `secure` overlay runs."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"# accepted tokens\n{TOKEN}\n\nanother-token\n")
    settings = settings_for(
        repository, tls_cert_file=server_pair.cert, tls_key_file=server_pair.key,
        auth_token_file=tokens, health_port=0,
    )  # fmt: skip
    server = _start(settings)
    yield server
    server.close()


def test_tls_serves_and_plaintext_fails(tls_server: RunningServer, pki: Pki):
    with _tls_channel(tls_server.port, pki.ca) as channel:
        assert _live(channel, GOOD)
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as plain:
        assert _code(lambda: _live(plain, GOOD)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_trusts_another_ca_fails_the_handshake(tls_server, tmp_path):
    other = Pki(tmp_path / "other", name="other-ca")
    with _tls_channel(tls_server.port, other.ca) as channel:
        assert _code(lambda: _live(channel, GOOD)) == grpc.StatusCode.UNAVAILABLE


def _infer_request() -> pb.ModelInferRequest:
    return codec.infer_request("self", random_inputs("self"), request_id="secure-1")


def _every_rpc(channel: grpc.Channel) -> dict[str, Any]:
    """One call per RPC of the inference and reflection services (metadata -> answer)."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

    def stream(metadata: Any) -> Any:
        answers = list(stub.ModelStreamInfer(iter([_infer_request()]), metadata=metadata,
                                             timeout=30))  # fmt: skip
        assert answers[0].error_message == ""
        return answers

    def reflection(metadata: Any) -> Any:
        asked = reflection_pb2.ServerReflectionRequest(list_services="")
        return list(reflect.ServerReflectionInfo(iter([asked]), metadata=metadata, timeout=30))

    return {
        "ServerLive": lambda m: stub.ServerLive(pb.ServerLiveRequest(), metadata=m, timeout=30),
        "ServerReady": lambda m: stub.ServerReady(pb.ServerReadyRequest(), metadata=m, timeout=30),
        "ModelReady": lambda m: stub.ModelReady(
            pb.ModelReadyRequest(name="self"), metadata=m, timeout=30
        ),
        "ServerMetadata": lambda m: stub.ServerMetadata(
            pb.ServerMetadataRequest(), metadata=m, timeout=30
        ),
        "ModelMetadata": lambda m: stub.ModelMetadata(
            pb.ModelMetadataRequest(name="self"), metadata=m, timeout=30
        ),
        "ModelStatistics": lambda m: stub.ModelStatistics(
            pb.ModelStatisticsRequest(name="self"), metadata=m, timeout=30
        ),
        "ModelInfer": lambda m: stub.ModelInfer(_infer_request(), metadata=m, timeout=30),
        "ModelStreamInfer": stream,
        "ServerReflectionInfo": reflection,
    }


@pytest.mark.parametrize("rpc", list(_every_rpc(grpc.insecure_channel("127.0.0.1:1"))))
def test_tokens_right_wrong_and_missing_on_every_rpc(tls_server, pki, rpc):
    with _tls_channel(tls_server.port, pki.ca) as channel:
        call = _every_rpc(channel)[rpc]
        call(GOOD)  # accepted
        call([("authorization", "bearer another-token")])  # the scheme is case-insensitive
        for metadata, message in (
            (None, MISSING_TOKEN),
            ([("authorization", "Bearer wrong")], WRONG_TOKEN),
            ([("authorization", TOKEN)], WRONG_TOKEN),  # no scheme
            ([("authorization", f"Basic {TOKEN}")], WRONG_TOKEN),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
            assert caught.value.details() == message


def test_health_needs_no_token_and_has_its_plaintext_port(tls_server, pki):
    asked = health_pb2.HealthCheckRequest(service="")
    with _tls_channel(tls_server.port, pki.ca) as channel:  # on the main port: no token
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(asked, timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    port = tls_server.server.health_port
    assert port is not None and port != tls_server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        health = health_pb2_grpc.HealthStub(plain)
        for service in ("", "liveness", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        # The health port serves health only: no inference without TLS and a token.
        stub = pb_grpc.GRPCInferenceServiceStub(plain)
        assert _code(lambda: stub.ServerLive(pb.ServerLiveRequest(), metadata=GOOD, timeout=30)) \
            == grpc.StatusCode.UNIMPLEMENTED  # fmt: skip


def test_health_port_follows_draining(repository: Path):
    server = _start(settings_for(repository, health_port=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as plain:
            health = health_pb2_grpc.HealthStub(plain)
            asked = health_pb2.HealthCheckRequest(service="")
            assert health.Check(asked, timeout=30).status == health_pb2.HealthCheckResponse.SERVING
            server.call(server.server.health.set_ready(False))  # what drain() does first
            status = health.Check(asked, timeout=30).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.close()


def test_token_file_is_reread_when_it_changes(repository: Path, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("first\n")
    server = _start(settings_for(repository, auth_token_file=tokens))
    try:
        with grpc.insecure_channel(server.url) as channel:
            assert _live(channel, [("authorization", "Bearer first")])
            fresh = tmp_path / "tokens.new"
            fresh.write_text("second\n")
            os.replace(fresh, tokens)  # what a Secret's symlink swap amounts to
            assert _live(channel, [("authorization", "Bearer second")])
            refused = _code(lambda: _live(channel, [("authorization", "Bearer first")]))
            assert refused == grpc.StatusCode.UNAUTHENTICATED
            tokens.write_text("")  # emptied: fail closed
            assert _code(lambda: _live(channel, [("authorization", "Bearer second")])) \
                == grpc.StatusCode.UNAUTHENTICATED  # fmt: skip
    finally:
        server.close()


def test_certificates_are_reloaded_under_a_live_server(repository: Path, tmp_path: Path):
    first, second = (
        Pki(tmp_path / "first", name="first-ca"),
        Pki(tmp_path / "second", name="second-ca"),
    )
    old, new = first.issue("server", server=True), second.issue("server", server=True)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(old.cert.read_bytes())
    key.write_bytes(old.key.read_bytes())
    server = _start(settings_for(repository, tls_cert_file=cert, tls_key_file=key))
    try:
        with _tls_channel(server.port, first.ca) as channel:
            assert _live(channel)
        # A half-done rotation (new certificate, old key) does not load: the old pair stays.
        os.replace(_copy(new.cert, tmp_path / "c.tmp"), cert)
        with _tls_channel(server.port, first.ca) as channel:
            assert _live(channel)
        os.replace(_copy(new.key, tmp_path / "k.tmp"), key)
        with _tls_channel(server.port, second.ca) as channel:
            assert _live(channel)
        with _tls_channel(server.port, first.ca) as channel:
            assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE
        assert server.server.certificates is not None
        assert server.server.certificates.reloads == 1
    finally:
        server.close()


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def test_mtls_requires_a_client_certificate_from_the_ca(
    repository: Path, pki: Pki, server_pair: Pair, client_pair: Pair, tmp_path: Path
):
    settings = settings_for(
        repository, tls_cert_file=server_pair.cert, tls_key_file=server_pair.key,
        tls_client_ca_file=pki.ca,
    )  # fmt: skip
    server = _start(settings)
    try:
        with _tls_channel(server.port, pki.ca, client_pair) as channel:
            assert _live(channel)
        with _tls_channel(server.port, pki.ca) as channel:  # no client certificate
            assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE
        stranger = Pki(tmp_path / "stranger", name="stranger-ca").issue("c", server=False)
        with _tls_channel(server.port, pki.ca, stranger) as channel:
            assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


def test_startup_refuses_a_key_that_does_not_match(repository, server_pair, tmp_path):
    settings = settings_for(
        repository, tls_cert_file=server_pair.cert, tls_key_file=stray_key(tmp_path / "k.pem")
    )
    server = Server(settings)
    with pytest.raises(StartupError) as caught:
        asyncio.run(server.start())
    message = str(caught.value)
    assert "the key does not match the certificate" in message and "\n" not in message


def test_startup_refuses_an_empty_token_file(repository, tmp_path):
    (tmp_path / "tokens").write_text("# none yet\n\n")
    with pytest.raises(StartupError, match="no token in it"):
        Server(settings_for(repository, auth_token_file=tmp_path / "tokens"))


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"tls_cert_file": Path("c")}, "both --tls-cert-file and --tls-key-file"),
        ({"tls_key_file": Path("k")}, "both --tls-cert-file and --tls-key-file"),
        ({"tls_client_ca_file": Path("ca")}, "needs TLS on"),
        ({"port": 9000, "health_port": 9000}, "never share a port"),
        ({"metrics_port": 9002, "health_port": 9002}, "is the metrics port"),
    ],
)
def test_settings_refuse_contradictions(fields, problem):
    with pytest.raises(ValueError, match=problem):
        dataclasses.replace(Settings(), **fields)


TRITON_TLS_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

port, ca, cert, key, token = sys.argv[1:6]
read = lambda p: open(p, "rb").read()
client = grpcclient.InferenceServerClient(
    url=f"localhost:{port}", ssl=True, root_certificates=ca, private_key=key,
    certificate_chain=cert,
)
headers = {"authorization": f"Bearer {token}"}
report = {"live": client.is_server_live(headers=headers)}
query = np.random.default_rng(0).standard_normal((1, 4, 64)).astype(np.float32)
tensor = grpcclient.InferInput("query", list(query.shape), "FP32")
tensor.set_data_from_numpy(query)
result = client.infer("self", [tensor], headers=headers)
report["shape"] = list(result.as_numpy("output").shape)
try:
    client.is_server_live()
except Exception as err:
    report["without_token"] = str(err)
print(json.dumps(report))
"""


def test_tritonclient_over_mtls_with_a_token(repository, pki, server_pair, client_pair, tmp_path):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    settings = settings_for(
        repository, tls_cert_file=server_pair.cert, tls_key_file=server_pair.key,
        tls_client_ca_file=pki.ca, auth_token_file=tokens,
    )  # fmt: skip
    server = _start(settings)
    try:
        args = [str(server.port), str(pki.ca), str(client_pair.cert), str(client_pair.key), TOKEN]
        done = subprocess.run(
            [sys.executable, "-c", TRITON_TLS_CLIENT, *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["live"] is True
        assert report["shape"] == [1, 4, 64]
        assert "UNAUTHENTICATED" in report["without_token"]
    finally:
        server.close()


def test_garbage_is_invalid_argument_on_every_rpc(running: RunningServer):
    """Undecodable bytes as the request of each RPC: INVALID_ARGUMENT, a fixed message."""
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length far past the end
    methods = {
        "ModelInfer": "inference.ModelInferRequest",
        "ModelMetadata": "inference.ModelMetadataRequest",
        "ModelReady": "inference.ModelReadyRequest",
        "ServerMetadata": "inference.ServerMetadataRequest",
        "ModelStatistics": "inference.ModelStatisticsRequest",
    }
    for method, message_type in methods.items():
        call = running.channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(garbage, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert caught.value.details() == f"request is not a valid {message_type}"
    check = running.channel.unary_unary("/grpc.health.v1.Health/Check")
    assert _code(lambda: check(garbage, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
    reflect = running.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    assert _code(lambda: list(reflect(iter([garbage]), timeout=30))) \
        == grpc.StatusCode.INVALID_ARGUMENT  # fmt: skip
    answer = running.stub.ModelInfer(_infer_request(), timeout=30)  # and it goes on serving
    assert codec.response_arrays(answer)["output"].shape == (2, 5, 64)


def test_garbage_on_a_stream_answers_that_message_and_the_stream_goes_on(running):
    stream = running.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    good = _infer_request().SerializeToString()
    answers = list(stream(iter([b"\x0a\xff\xff\xff\xff\x0f", good]), timeout=30))
    errors = [a.error_message for a in answers if a.error_message]
    assert errors == ["INVALID_ARGUMENT: request is not a valid inference.ModelInferRequest"]
    served = [a for a in answers if not a.error_message]
    assert len(served) == 1 and served[0].infer_response.id == "secure-1"
    output = codec.response_arrays(served[0].infer_response)["output"]
    np.testing.assert_equal(output.shape, (2, 5, 64))


def test_the_readme_certificates_serve_mtls_with_a_token(repository: Path, tmp_path: Path):
    """deploy/dev-certs.sh (the README's recipe) makes files the server and client accept."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary")
    script = Path(__file__).parents[2] / "deploy" / "dev-certs.sh"
    made = subprocess.run(["bash", str(script), str(tmp_path / "tls")], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    tls = tmp_path / "tls"
    settings = settings_for(
        repository, tls_cert_file=tls / "server.crt", tls_key_file=tls / "server.key",
        tls_client_ca_file=tls / "ca.crt", auth_token_file=tls / "tokens",
    )  # fmt: skip
    server = _start(settings)
    try:
        token = (tls / "token").read_text().strip()
        client = Pair(tls / "client.crt", tls / "client.key")
        with _tls_channel(server.port, tls / "ca.crt", client) as channel:
            assert _live(channel, [("authorization", f"Bearer {token}")])
            assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.close()
