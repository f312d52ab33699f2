"""Contenders: the servers a benchmark measures, started and stopped side by side.

`mha serve` binds port 0 (gRPC and metrics) and writes the ports it got to files, so no
other process can take a port between its choice and its bind; it is ready at its first
grpc.health.v1 SERVING answer. The echo (mha.bench.framework.echo) binds port 0 too and is
ready at its first ServerReady. An external server (--url) is a contender without a process
of ours: its memory comes from --server-pid, its /metrics from --metrics-url, or n/a.
`Contenders` owns them all: port files in a temporary folder removed when it closes, logs
in the run's output folder, every process stopped on the way out.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mha.client import Client, ClientError

CONFIG_FLAGS = {  # a served configuration -> its `mha serve` flags
    "on": ["--batching"],
    "off": ["--no-batching"],
    "floor": ["--no-batching", "--no-compute"],
    # mha.service.frontends: N protocol processes before one engine (batching on)
    "frontends-1": ["--batching", "--frontends", "1"],
    "frontends-2": ["--batching", "--frontends", "2"],
    "frontends-default": ["--batching"],  # --frontends by the CPU quota
}
ECHO_PROCESSES = {"echo": 1, "echo-2": 2}  # echo configs -> processes on one port


class ServerFailed(RuntimeError):
    """The server exited or did not become ready in time."""


def mha_command() -> list[str]:
    """The `mha` entry point of this environment."""
    beside = Path(sys.executable).with_name("mha")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mha")
    return [found] if found else [sys.executable, "-m", "mha.cli"]


def _tree(pid: int) -> list[int]:
    """pid and its descendants (a server with frontends is several processes)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(p for child in children for p in _tree(int(child)))]


def rss_mb(pid: int | None) -> float | None:
    """Resident memory (VmRSS) of a process and its children, summed, MB (10**6 bytes);
    None when unknown. Pages the processes share (forked ones, the frontends' arenas) count
    once per process: an upper bound on what the server holds."""
    if pid is None:
        return None
    total = None
    for member in _tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)  # kB here means KiB
        if match:
            total = (total or 0.0) + int(match[1]) * 1024 / 1e6
    return total


def loopback(port_file: Path) -> list[str]:
    """The flags of a server on loopback that binds port 0 and writes the port it got."""
    return ["--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]


def log_tail(path: Path | None, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""
    return ""


@dataclass
class Server:
    """A contender on the wire: where it answers, and how to read its memory and metrics."""

    url: str
    pid: int | None = None
    metrics_url: str | None = None
    process: subprocess.Popen | None = None  # ours to stop; None for an external server
    startup_s: float | None = None
    log_path: Path | None = None
    flags: list[str] = field(default_factory=list)
    program: str = "the server"  # what the messages call it
    companions: list[Server] = field(default_factory=list)  # more processes on its port

    def rss_mb(self) -> float | None:
        figures = [rss_mb(s.pid) for s in (self, *self.companions)]
        known = [f for f in figures if f is not None]
        return sum(known) if known else None

    def metrics(self) -> str | None:
        """The /metrics text; None without an endpoint (the echo) or when it does not answer."""
        if self.metrics_url is None:
            return None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return None

    def check_alive(self) -> None:
        """ServerFailed when a server of ours has exited: no figure would mean much."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerFailed(
                f"{self.program} exited with {self.process.returncode}:\n{log_tail(self.log_path)}"
            )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it lingers; the exit status (None: not ours)."""
        for companion in self.companions:
            companion.stop(timeout)
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def record(self, **extra: Any) -> dict[str, Any]:
        """The JSON record of the server."""
        return {
            "url": self.url,
            "started_by_bench": self.process is not None,
            "pid": self.pid,
            "metrics_url": self.metrics_url,
            "flags": self.flags or None,
            "startup_s": self.startup_s,
            "rss_mb": self.rss_mb(),
            "log": str(self.log_path) if self.log_path else None,
            **extra,
        }


class Contenders:
    """Servers started for one run; `with Contenders(out) as c:` stops them all after."""

    def __init__(self, logs: Path, threads: int | None = None, extra: Sequence[str] = ()) -> None:
        self.logs, self.threads, self.extra = logs, threads, list(extra)
        self.started: dict[str, Server] = {}
        self._files = tempfile.TemporaryDirectory(prefix="mha-bench-")

    def __enter__(self) -> Contenders:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()
        self._files.cleanup()

    def stop_all(self) -> None:
        for server in self.started.values():
            server.stop()
        self.started.clear()

    def serve(
        self,
        name: str,
        repository: Path,
        config: str = "on",
        extra: Sequence[str] = (),
        leak_mb_per_s: float = 0.0,
    ) -> Server:
        """Start `mha serve` on loopback in `config` (CONFIG_FLAGS) and wait until SERVING.

        leak_mb_per_s > 0 runs it under mha.bench.framework.leak: the same server, with memory
        held at that rate (the soak's check that its verdict catches a leak)."""
        files = Path(tempfile.mkdtemp(dir=self._files.name))
        port_file, metrics_file = files / "port", files / "metrics-port"
        flags = [*CONFIG_FLAGS[config], *self.extra, *extra]
        flags += ["--threads", str(self.threads)] if self.threads else []
        program = mha_command()
        if leak_mb_per_s > 0:
            program = [sys.executable, "-m", "mha.bench.framework.leak", f"{leak_mb_per_s:g}"]
        metrics = ["--metrics-port", "0", "--metrics-port-file", str(metrics_file)]
        command = [*program, "serve", "--repository", str(repository), *loopback(port_file),
                   *metrics, *flags]  # fmt: skip
        print(f"starting mha serve ({name}) ...", file=sys.stderr, flush=True)
        serving: Callable[[Client], bool] = lambda c: c.health("") == "SERVING"  # noqa: E731
        server = self._launch(name, command, port_file, 180.0, serving, "mha serve")
        server.metrics_url = f"http://127.0.0.1:{int(metrics_file.read_text())}/metrics"
        server.flags = flags
        return server

    def echo(self, version_dir: Path, name: str = "echo", processes: int = 1) -> Server:
        """Start the echo (no /metrics, no ModelStatistics) and wait until ServerReady;
        processes > 1: that many on one port (SO_REUSEPORT), the bound of as many frontends."""
        server: Server | None = None
        for index in range(processes):
            port_file = Path(tempfile.mkdtemp(dir=self._files.name)) / "port"
            command = [sys.executable, "-m", "mha.bench.framework.echo", "--model-dir",
                       str(version_dir), *loopback(port_file)]  # fmt: skip
            if processes > 1:
                command.append("--reuse-port")
            if server is not None:  # the others bind the first one's port
                command[command.index("--port") + 1] = server.url.rsplit(":", 1)[1]
            print(f"starting the echo server ({index + 1}/{processes}) ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            named = name if index == 0 else f"{name}-{index}"
            started = self._launch(named, command, port_file, 60.0, Client.ready, "echo")
            if server is None:
                server = started
            else:  # stopped and measured with the first
                server.companions.append(self.started.pop(named))
        assert server is not None
        server.flags = ["echo"] if processes == 1 else ["echo", f"x{processes}"]
        return server

    def _launch(
        self,
        name: str,
        command: list[str],
        port_file: Path,
        timeout_s: float,
        is_ready: Callable[[Client], bool],
        program: str,
    ) -> Server:
        log_path = self.logs / f"server-{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            began = time.perf_counter()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = Server("", process.pid, None, process, None, log_path, program=program)
        self.started[name] = server
        deadline = began + timeout_s
        while time.perf_counter() < deadline:
            server.check_alive()
            if not server.url and port_file.exists() and port_file.read_text().strip():
                server.url = f"127.0.0.1:{int(port_file.read_text().strip())}"
            if server.url:
                with contextlib.suppress(ClientError), Client(server.url, timeout=1.0) as client:
                    if is_ready(client):
                        server.startup_s = time.perf_counter() - began
                        return server
            time.sleep(0.005)
        raise ServerFailed(f"{name} not ready in time:\n{log_tail(log_path)}")


def given_or_started(
    args: Any,
    contenders: Contenders,
    repository: Path,
    extra: Sequence[str] = (),
    leak_mb_per_s: float = 0.0,
) -> Server:
    """The server of --url (--server-pid, --metrics-url), or `mha serve` started on
    `repository` with batching on and `extra` flags."""
    if args.url:
        return Server(args.url, args.server_pid, args.metrics_url)
    return contenders.serve("on", repository, "on", extra, leak_mb_per_s)
