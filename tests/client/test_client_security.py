"""The client against a secured server: mTLS and a token, sync, async, streams and `mha infer`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from certs import Pair, Pki
from harness import RunningServer, settings_for

from mha.client.aio import AsyncClient
from mha.client.core import ClientError
from mha.client.security import Security
from mha.client.sync import Client

TOKEN = "client-token-41c9"


@pytest.fixture(scope="module")
def secured(client_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A loaded server with mTLS and tokens, and the files a client needs."""
    root = tmp_path_factory.mktemp("client-security")
    pki = Pki(root / "pki")
    server_pair, client_pair = pki.issue("server", server=True), pki.issue("client", server=False)
    (root / "tokens").write_text(f"{TOKEN}\n")
    (root / "client-token").write_text(f"# the client's copy\n{TOKEN}\n")
    (root / "wrong-token").write_text("not-it\n")
    settings = settings_for(
        client_repo, tls_cert_file=server_pair.cert, tls_key_file=server_pair.key,
        tls_client_ca_file=pki.ca, auth_token_file=root / "tokens",
    )  # fmt: skip
    server = RunningServer(settings).load()
    yield {"url": f"localhost:{server.port}", "pki": pki, "client": client_pair, "root": root}
    server.close()


def _security(secured: dict, token: str = "client-token", client: Pair | None = None) -> Security:
    pair = client or secured["client"]
    return Security(
        ca_file=secured["pki"].ca, cert_file=pair.cert, key_file=pair.key,
        token_file=secured["root"] / token,
    )  # fmt: skip


def _query() -> dict[str, np.ndarray]:
    return {"query": np.random.default_rng(3).standard_normal((1, 4, 64)).astype(np.float32)}


def test_sync_client_and_its_stream(secured):
    with Client(secured["url"], security=_security(secured)) as client:
        assert client.live() and client.ready()
        assert client.infer("self", _query()).outputs["output"].shape == (1, 4, 64)
        with client.stream() as stream:
            stream.send("self", _query(), request_id="s-1")
            answer = stream.receive()
        assert answer.error is None and answer.result is not None
        assert answer.result.id == "s-1"


def test_async_client_and_its_stream(secured):
    async def run() -> tuple[bool, tuple[int, ...], str]:
        async with AsyncClient(secured["url"], security=_security(secured)) as client:
            live = await client.live()
            result = await client.infer("self", _query())
            async with client.stream() as stream:
                await stream.send("self", _query(), request_id="a-1")
                answer = await stream.receive()
            assert answer.result is not None
            return live, result.outputs["output"].shape, answer.result.id

    assert asyncio.run(run()) == (True, (1, 4, 64), "a-1")


def test_a_wrong_token_is_unauthenticated(secured):
    wrong = _security(secured, token="wrong-token")
    with Client(secured["url"], security=wrong) as client, pytest.raises(ClientError) as caught:
        client.live()
    assert caught.value.code.name == "UNAUTHENTICATED"


def test_security_refuses_half_a_client_pair(secured):
    with pytest.raises(ValueError, match="both --tls-cert-file and --tls-key-file"):
        Security(ca_file=secured["pki"].ca, cert_file=secured["client"].cert)


def _mha_infer(secured: dict, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mha.cli", "infer", "--url", secured["url"], "--model",
               "self", "-b", "1", "-l", "4", *flags]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_mha_infer_with_tls_files_and_a_token(secured):
    root, pki, client = secured["root"], secured["pki"], secured["client"]
    files = ["--tls-ca-file", str(pki.ca), "--tls-cert-file", str(client.cert),
             "--tls-key-file", str(client.key)]  # fmt: skip
    done = _mha_infer(secured, *files, "--token-file", str(root / "client-token"))
    assert done.returncode == 0, done.stderr
    assert "output" in done.stdout and TOKEN not in done.stdout + done.stderr
    refused = _mha_infer(secured, *files)  # no token
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    missing = _mha_infer(secured, "--tls-ca-file", str(root / "absent.pem"))
    assert missing.returncode != 0 and "absent.pem: no such file" in missing.stderr
