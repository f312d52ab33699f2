"""Servers as subprocesses for the benchmark: start, time to ready, memory, stop.

`mha serve` binds port 0 and writes the port it got to --port-file; the time to SERVING is
measured from process start to the first grpc.health.v1 SERVING answer for service "".
Its metrics port is bound the same way (port 0, a file) so the bench can scrape /metrics.
The echo contender (mha.bench.echo) binds port 0 too and is ready at its first ServerReady.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mha.client import Client, ClientError

# bench configuration -> `mha serve` flags
CONFIG_FLAGS = {
    "on": ["--batching"],
    "off": ["--no-batching"],
    "floor": ["--no-batching", "--no-compute"],
}


class ServerFailed(RuntimeError):
    """The server exited or did not become SERVING in time."""


def mha_command() -> list[str]:
    """The `mha` entry point of this environment."""
    beside = Path(sys.executable).with_name("mha")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mha")
    return [found] if found else [sys.executable, "-m", "mha.cli"]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    metrics_port: int  # 0: no metrics endpoint (the echo)
    startup_s: float
    log_path: Path
    flags: list[str] = field(default_factory=list)

    def rss_mb(self) -> float:
        """Resident memory of the serving process (VmRSS), MB (10**6 bytes)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)  # kB here means KiB
        return int(match[1]) * 1024 / 1e6 if match else float("nan")

    def metrics(self) -> str:
        """The Prometheus text exposition of /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if it lingers; return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def start_server(
    repository: Path,
    config: str,
    *,
    threads: int | None,
    extra: list[str],
    log_dir: Path,
    timeout_s: float = 180.0,
) -> ServerProcess:
    """Start `mha serve` on loopback in `config` and wait until it is SERVING."""
    # Both ports are bound by the server itself (port 0) and written to files, so no other
    # process can take a port between its choice and its bind.
    files = Path(tempfile.mkdtemp(dir=log_dir))
    port_file, metrics_port_file = files / "port", files / "metrics-port"
    flags = [*CONFIG_FLAGS[config], *extra] + (["--threads", str(threads)] if threads else [])
    command = [
        *mha_command(),
        "serve",
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--metrics-port",
        "0",
        "--metrics-port-file",
        str(metrics_port_file),
        *flags,
    ]
    process, url, startup, log_path = _launch(
        "mha serve", command, port_file, log_dir / f"server-{config}.log", timeout_s, _serving
    )
    metrics_port = int(metrics_port_file.read_text())  # written before the gRPC port file
    return ServerProcess(process, url, metrics_port, startup, log_path, flags)


def start_echo(version_dir: Path, *, log_dir: Path, timeout_s: float = 60.0) -> ServerProcess:
    """Start the echo contender (mha.bench.echo) on loopback; wait until ServerReady.

    It has no metrics endpoint (metrics_port 0) and no ModelStatistics.
    """
    port_file = Path(tempfile.mkdtemp(dir=log_dir)) / "port"
    command = [sys.executable, "-m", "mha.bench.echo", "--model-dir", str(version_dir),
               "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]  # fmt: skip
    process, url, startup, log_path = _launch(
        "echo", command, port_file, log_dir / "server-echo.log", timeout_s, Client.ready
    )
    return ServerProcess(process, url, 0, startup, log_path, ["echo"])


def _serving(client: Client) -> bool:
    return client.health("") == "SERVING"


def _launch(
    name: str,
    command: list[str],
    port_file: Path,
    log_path: Path,
    timeout_s: float,
    is_ready: Callable[[Client], bool],
) -> tuple[subprocess.Popen, str, float, Path]:
    """Start a server process; return it, its URL and its seconds from start to ready."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = _wait_ready(name, process, port_file, started + timeout_s, log_path, is_ready)
    except BaseException:
        ServerProcess(process, "", 0, 0.0, log_path).stop(timeout=5)
        raise
    return process, url, time.perf_counter() - started, log_path


def _wait_ready(
    name: str,
    process: subprocess.Popen,
    port_file: Path,
    deadline: float,
    log: Path,
    is_ready: Callable[[Client], bool],
) -> str:
    url = ""
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"{name} exited with {process.returncode}:\n{log_tail(log)}")
        if not url and port_file.exists() and port_file.read_text().strip():
            url = f"127.0.0.1:{int(port_file.read_text().strip())}"
        if url:
            with contextlib.suppress(ClientError), Client(url, timeout=1.0) as client:
                if is_ready(client):
                    return url
        time.sleep(0.005)
    raise ServerFailed(f"{name} not ready in time:\n{log_tail(log)}")


def histogram_totals(text: str, name: str, model: str) -> tuple[float, float]:
    """(sum, count) of a histogram over every version of `model`, from /metrics text."""
    totals = {"sum": 0.0, "count": 0.0}
    pattern = re.compile(rf"^{re.escape(name)}_(sum|count)\{{([^}}]*)\}} (\S+)$", re.MULTILINE)
    for kind, labels, value in pattern.findall(text):
        if f'model="{model}"' in labels:
            totals[kind] += float(value)
    return totals["sum"], totals["count"]
