"""Fixtures of the client tests: a real `mha serve` Server on port 0 (tests/harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import RunningServer, link_repository, settings_for

# Model name in the test repository -> ExportOptions fields (d_model 64, 4 heads). The same
# fields as other test folders use, so the session's export cache builds each one once.
MODELS: dict[str, dict[str, object]] = {
    "self": {"target": "ort"},
    "cross": {"target": "ort", "self_attention": False, "attention_weights": True},
}


@pytest.fixture(scope="session")
def client_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with every MODELS entry as version 1 (links to the exports)."""
    return link_repository(tmp_path_factory.mktemp("client-repo"), exported, MODELS)


@pytest.fixture(scope="session")
def server_url(client_repo: Path) -> Iterator[str]:
    """host:port of a loaded server with the default settings (batching on), loopback."""
    server = RunningServer(settings_for(client_repo, batching=True, grace_seconds=2)).load()
    yield server.url
    server.close()
