"""Fixtures of the service tests: a model repository and a shared running server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import link_repository
from service_helpers import MODELS, RunningServer, settings_for


@pytest.fixture(scope="session")
def repository(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with every MODELS entry as version 1 (links to the exports)."""
    return link_repository(tmp_path_factory.mktemp("serve-repo"), exported, MODELS)


@pytest.fixture(scope="module")
def running(repository: Path) -> Iterator[RunningServer]:
    """One loaded server (every model, no batching) shared by a test module."""
    server = RunningServer(settings_for(repository)).load()
    yield server
    server.close()
