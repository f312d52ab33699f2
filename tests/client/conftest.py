"""Fixtures of the client tests: a real `mha serve` Server on port 0, in a background loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mha.service.core.settings import Settings
from mha.service.grpc.server import Server

# Model name in the test repository -> ExportOptions fields (d_model 64, 4 heads). The same
# fields as other test folders use, so the session's export cache builds each one once.
MODELS: dict[str, dict[str, object]] = {
    "self": {"target": "ort"},
    "cross": {"target": "ort", "self_attention": False, "attention_weights": True},
}


@pytest.fixture(scope="session")
def client_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with every MODELS entry as version 1 (links to the exports)."""
    root = tmp_path_factory.mktemp("client-repo")
    for name, fields in MODELS.items():
        (root / name).mkdir()
        (root / name / "1").symlink_to(exported(**fields), target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def server_url(client_repo: Path) -> Iterator[str]:
    """host:port of a loaded server with the default settings (batching on), loopback."""
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        repository=client_repo,
        device="cpu",
        threads=2,
        grace_seconds=2,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = Server(settings)

    def call(coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(120)

    port = call(server.start())
    call(server.load_models())
    yield f"127.0.0.1:{port}"
    call(server.stop())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
