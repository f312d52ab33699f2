"""The supervisor: `mha serve --frontends N` (N > 1) as one server to the outside.

It binds the gRPC (and health) port itself first, so port 0 becomes one concrete port that
every frontend then binds with SO_REUSEPORT (the held socket never listens: the kernel hands
connections to the frontends only). It starts the engine with the link's listening Unix
socket, then the frontends (forked: this process imports neither gRPC nor ONNX Runtime, and
runs no threads), and writes --port-file once every frontend has bound.

While serving: a frontend that dies is started again (its clients' calls in flight end
UNAVAILABLE with its connections); if the engine dies, the frontends stop (NOT_SERVING,
mha.service.frontends.frontend) and the supervisor exits non-zero, so the pod restarts.
SIGTERM/SIGINT: the frontends drain and stop (--drain-seconds, --grace-seconds), then the
engine stops, then the supervisor exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from mha.service.core import devices
from mha.service.core.settings import Settings

log = logging.getLogger(__name__)
ENGINE_STOP_SECONDS = 10  # beyond grace: the engine finishing what the frontends sent last
RESTARTS_PER_MINUTE = 10  # more frontend deaths than this: the server stops (a crash loop)
PR_SET_PDEATHSIG = 1
# Sizing (docs/performance.md, "Frontends"): on 2 cores one process measured best (two
# frontends 0.71-0.86x of it); from 3 CPUs up the rule is the docs' projection, not measured.
MIN_CPUS_FOR_FRONTENDS = 3
CPUS_PER_FRONTEND = 2
MAX_FRONTENDS = 8


def default_frontends(cpus: float | None = None) -> int:
    """Frontends for the CPUs this process may use (the cgroup quota, else the cores)."""
    if cpus is None:
        cpus = devices.cpu_quota() or float(os.cpu_count() or 1)
    if cpus < MIN_CPUS_FOR_FRONTENDS:
        return 1
    return max(2, min(MAX_FRONTENDS, int(cpus // CPUS_PER_FRONTEND)))


def hold_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (never listen) host:port with SO_REUSEPORT; the socket and the port bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot bind gRPC to {host}:{port}: {err.strerror}") from err
    return sock, sock.getsockname()[1]


def write_port_file(path: Path, port: int) -> None:
    """Atomically, as the lone server writes it (not imported from it: no gRPC here)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def _child_signals() -> None:
    """Undo the supervisor's signal handling in a forked child (until the child installs
    its own, SIGTERM ends it: it has nothing to drain yet), and SIGTERM the child when the
    supervisor goes (killed), so nothing is left serving."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _engine_main(settings: Settings, frontends: int, listener: socket.socket) -> None:
    _child_signals()
    from mha.service.core.errors import StartupError
    from mha.service.frontends.engine import Engine

    try:
        engine = Engine(settings, frontends)
        asyncio.run(engine.run(listener, settings.metrics_port_file))
    except (StartupError, OSError) as err:
        log.error("the engine cannot start: %s", err)
        raise SystemExit(2) from None


def _frontend_main(settings: Settings, index: int, engine_socket: Path) -> None:
    _child_signals()
    from mha.service.frontends import frontend

    raise SystemExit(asyncio.run(frontend.run(settings, index, engine_socket)))


class Supervisor:
    def __init__(self, settings: Settings, frontends: int) -> None:
        self.settings = settings
        self.count = frontends
        self.context = multiprocessing.get_context("fork")
        self.folder = Path(tempfile.mkdtemp(prefix="mha-serve-"))
        self.frontends: dict[int, BaseProcess] = {}
        self.engine: BaseProcess | None = None
        self.stopping = False
        self.deaths: list[float] = []

    def _frontend_settings(self, port: int, health_port: int | None, index: int) -> Settings:
        return dataclasses.replace(
            self.settings, port=port, health_port=health_port, metrics_port=None,
            port_file=self.folder / f"frontend-{index}.port", health_port_file=None,
            metrics_port_file=None,
        )  # fmt: skip

    def start_frontend(self, index: int) -> None:
        settings = self.frontend_settings[index]
        assert settings.port_file is not None
        settings.port_file.unlink(missing_ok=True)
        process = self.context.Process(
            target=_frontend_main, args=(settings, index, self.folder / "engine.sock"),
            name=f"mha-frontend-{index}",
        )  # fmt: skip
        process.start()
        self.frontends[index] = process
        log.info("frontend %d started (pid %d)", index, process.pid)

    def run(self) -> int:
        """Serve until a signal or the engine's end; the exit code of `mha serve`."""
        settings = self.settings
        held, port = hold_port(settings.host, settings.port)
        health = None
        if settings.health_port is not None:
            health = hold_port(settings.host, settings.health_port)
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(self.folder / "engine.sock"))
            listener.listen(64)
            engine_settings = dataclasses.replace(settings, port_file=None, health_port=None)
            self.engine = self.context.Process(
                target=_engine_main, args=(engine_settings, self.count, listener),
                name="mha-engine",
            )  # fmt: skip
            self.engine.start()
            listener.close()
            log.info("engine started (pid %d)", self.engine.pid)
            health_port = None if health is None else health[1]
            self.frontend_settings = {
                i: self._frontend_settings(port, health_port, i) for i in range(self.count)
            }
            for index in range(self.count):
                self.start_frontend(index)
            return self._watch(port, health_port, wake_read)
        finally:
            signal.set_wakeup_fd(-1)
            held.close()
            if health is not None:
                health[0].close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _watch(self, port: int, health_port: int | None, wake: socket.socket) -> int:
        announced = False
        assert self.engine is not None
        while True:
            if not announced and self._all_bound():
                announced = True
                self._announce(port, health_port)
            if self.stopping:
                return self._stop()
            sentinels = [self.engine.sentinel, *(p.sentinel for p in self.frontends.values())]
            wait([*sentinels, wake], timeout=None if announced else 0.02)
            with contextlib.suppress(BlockingIOError):  # a signal's byte, if one woke us
                wake.recv(512)
            if self.engine.exitcode is not None:
                return self._engine_gone()
            for index, process in list(self.frontends.items()):
                gone = process.exitcode is not None and not self.stopping
                if gone and not self._frontend_died(index, process):
                    return self._stop(code=1)

    def _all_bound(self) -> bool:
        return all(s.port_file is not None and s.port_file.exists()
                   for s in self.frontend_settings.values())  # fmt: skip

    def _announce(self, port: int, health_port: int | None) -> None:
        log.info("%d frontends on port %d", self.count, port)
        if health_port is not None and self.settings.health_port_file is not None:
            write_port_file(self.settings.health_port_file, health_port)
        if self.settings.port_file is not None:
            write_port_file(self.settings.port_file, port)

    def _frontend_died(self, index: int, process: BaseProcess) -> bool:
        """Start it again unless it crash-loops; False when the server must stop."""
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < 60] + [now]
        log.error("frontend %d (pid %d) exited with %s", index, process.pid, process.exitcode)
        if len(self.deaths) > RESTARTS_PER_MINUTE:
            log.error("frontends died %d times within a minute: stopping", len(self.deaths))
            return False
        self.start_frontend(index)
        return True

    def _engine_gone(self) -> int:
        assert self.engine is not None
        code = self.engine.exitcode
        if not self.stopping:
            log.error("the engine (pid %d) exited with %s: stopping", self.engine.pid, code)
        self.stopping = True
        self._join_frontends()
        return 1

    def _join_frontends(self) -> None:
        limit = time.monotonic() + self.settings.drain_seconds + self.settings.grace_seconds + 5
        for process in self.frontends.values():
            process.join(max(0.0, limit - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()

    def _stop(self, code: int = 0) -> int:
        """Drain and stop the frontends, then the engine."""
        assert self.engine is not None
        log.info("stopping: %d frontends drain, then the engine", len(self.frontends))
        for process in self.frontends.values():
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        self._join_frontends()
        if self.engine.exitcode is None and self.engine.pid is not None:
            os.kill(self.engine.pid, signal.SIGTERM)
        self.engine.join(self.settings.grace_seconds + ENGINE_STOP_SECONDS)
        if self.engine.exitcode is None:  # a stuck engine does not keep the pod from restarting
            log.error("the engine did not stop: killed")
            self.engine.kill()
            self.engine.join()
        return code if self.engine.exitcode == 0 else 1
