"""The one harness for servers in tests: a real grpc.aio Server on port 0, in a thread's loop.

The server runs in its own thread with its own event loop, so tests talk to it through
ordinary (sync) gRPC channels, as any client would. `link_repository` builds a model
repository of links to the session's exports (tests/conftest.py `exported`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core.scheduling import Runner
from mha.service.core.settings import Settings
from mha.service.grpc.server import Server

T = TypeVar("T")


def link_repository(
    root: Path, exported: Callable[..., Path], models: Mapping[str, Mapping[str, Any]]
) -> Path:
    """A repository in root with each model (name -> ExportOptions fields) as version 1."""
    for name, fields in models.items():
        (root / name).mkdir()
        (root / name / "1").symlink_to(exported(**fields), target_is_directory=True)
    return root


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
        self.url = f"127.0.0.1:{self.port}"
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
    """Test settings: port 0, no metrics endpoint, 2 threads, no batching by default, and no
    refusal by expected queue time (an estimate of durations: on a loaded machine it refuses
    what a test sends; tests of admission set max_queue_delay_ms themselves)."""
    base = Settings(
        host="127.0.0.1", port=0, metrics_port=None, repository=repository, device="cpu",
        threads=2, batching=False, grace_seconds=5, max_queue_delay_ms=0,
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)


def run_client_script(
    script: str, port: int, plan: Mapping[str, np.ndarray], folder: Path
) -> tuple[str, dict[str, np.ndarray]]:
    """Run a third-party client `script` (python -c) against 127.0.0.1:port in its own
    process: argv = port, plan.npz, answers.npz. Returns its stdout and the answers it wrote."""
    np.savez(folder / "plan.npz", **plan)
    done = subprocess.run(
        [sys.executable, "-c", script, str(port), str(folder / "plan.npz"),
         str(folder / "answers.npz")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, dict(np.load(folder / "answers.npz"))
