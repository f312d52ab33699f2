"""The server `mha bench flood` and `mha bench soak` measure: started here, or given by --url.

Started: `mha serve` on loopback, port 0 (mha.bench.servers), on a repository holding the
embedded default model (exported when missing); its resident memory and /metrics come from
the process this bench owns. Given: --url, with --server-pid for its memory (a process on
this machine) and --metrics-url for its /metrics; without them those figures are n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mha.bench import arguments
from mha.bench.servers import (
    ServerFailed,
    ServerProcess,
    histogram_totals,
    log_tail,
    mha_command,
    start_server,
)
from mha.errors import CliError

DEFAULT_MODEL = "mha"  # what `mha export` writes without --name
COMPUTE = "mha_compute_duration_seconds"  # one session run (a batch counts once)
BATCH = "mha_batch_size_samples"
QUEUE_DELAY_FLAG = "--max-queue-delay-ms"
QUEUE_DELAY_ENV = "MHA_MAX_QUEUE_DELAY_MS"


@dataclass
class Target:
    """Where the requests go, and how to read the serving process's memory and metrics."""

    url: str
    pid: int | None = None
    metrics_url: str | None = None
    process: ServerProcess | None = None

    def rss_mb(self) -> float | None:
        """VmRSS of the serving process, MB (10**6 bytes); None when unknown."""
        if self.pid is None:
            return None
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)  # kB here means KiB
        return int(match[1]) * 1024 / 1e6 if match else None

    def metrics(self) -> str | None:
        """The /metrics text, or None without an endpoint (or when it does not answer)."""
        if self.metrics_url is None:
            return None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return None

    def run_totals(self, model: str) -> dict[str, float] | None:
        """Session-run totals of `model` so far: compute seconds, runs, samples."""
        return run_totals(self.metrics(), model)

    def check_alive(self) -> None:
        """CliError when the server this bench started has exited: no figure would mean much."""
        if self.process is not None and self.process.process.poll() is not None:
            code = self.process.process.returncode
            tail = log_tail(self.process.log_path)
            raise CliError(f"mha serve exited with {code} during the run:\n{tail}")

    def stop(self) -> int | None:
        return self.process.stop() if self.process is not None else None

    def record(self) -> dict[str, Any]:
        """The JSON record of the server."""
        started = self.process
        return {
            "url": self.url,
            "started_by_bench": started is not None,
            "pid": self.pid,
            "metrics_url": self.metrics_url,
            "flags": started.flags if started else None,
            "startup_s": started.startup_s if started else None,
            "log": str(started.log_path) if started else None,
        }


def run_totals(text: str | None, model: str) -> dict[str, float] | None:
    """Session-run totals of `model` in /metrics text: compute seconds, runs, samples."""
    if text is None:
        return None
    seconds, runs = histogram_totals(text, COMPUTE, model)
    samples, _ = histogram_totals(text, BATCH, model)
    return {"compute_s": seconds, "runs": runs, "samples": samples}


def add_target_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--url, --server-pid, --metrics-url, and the "server" group (repository, threads, args)."""
    given = parser.add_argument_group("an existing server (default: start `mha serve` here)")
    given.add_argument("--url", help="host:port of an Open Inference Protocol gRPC server")
    given.add_argument("--server-pid", type=int, help="its process id, for its VmRSS")
    given.add_argument("--metrics-url", help="its Prometheus endpoint, http://host:port/metrics")
    server = arguments.add_server_arguments(
        parser, "model repository (default OUT/models; the default model exported if missing)"
    )
    server.add_argument(
        QUEUE_DELAY_FLAG,
        type=float,
        dest="max_queue_delay_ms",
        help="passed to mha serve; also the bound of the latency target (default: the "
        "server's default, or what --server-arg gives)",
    )
    return server


def ensure_default_model(repository: Path) -> None:
    """repository/mha/<version> with the embedded default model, exported when missing."""
    if any((repository / DEFAULT_MODEL).glob("*/model.onnx")):
        return
    print(f"exporting the default model to {repository} ...", file=sys.stderr, flush=True)
    command = [*mha_command(), "export", "--repository", str(repository), "--if-missing"]
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
        raise CliError("`mha export` failed; see its output above")


def open_target(args: argparse.Namespace, repository: Path, extra: list[str]) -> Target:
    """The server of --url, or `mha serve` on `repository` started with `extra` flags."""
    if args.url:
        return Target(args.url, args.server_pid, args.metrics_url)
    flags = [*args.server_arg, *extra]
    if args.max_queue_delay_ms is not None:
        flags += [QUEUE_DELAY_FLAG, f"{args.max_queue_delay_ms:g}"]
    print("starting mha serve ...", file=sys.stderr, flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="mha-bench-"))
    try:
        process = start_server(repository, "on", threads=args.threads, extra=flags, log_dir=log_dir)
    except ServerFailed as err:
        raise CliError(str(err)) from None
    metrics_url = f"http://127.0.0.1:{process.metrics_port}/metrics"
    return Target(process.url, process.process.pid, metrics_url, process)


def max_queue_delay_ms(args: argparse.Namespace) -> tuple[float, str]:
    """The server's queue-delay bound (ms, 0 = off) and where that value came from."""
    if args.max_queue_delay_ms is not None:
        return float(args.max_queue_delay_ms), QUEUE_DELAY_FLAG
    given = flag_value(list(args.server_arg), QUEUE_DELAY_FLAG)
    if given is not None and not args.url:
        return given, "--server-arg"
    with contextlib.suppress(ValueError):
        if os.environ.get(QUEUE_DELAY_ENV) and not args.url:
            return float(os.environ[QUEUE_DELAY_ENV]), QUEUE_DELAY_ENV
    from mha.service.core.settings import Settings

    default = Settings().max_queue_delay_ms
    return default, "assumed: the server's default" if args.url else "the server's default"


def flag_value(flags: list[str], name: str) -> float | None:
    """The last value of `name` in flags ("--x=1" or "--x 1"), as a number."""
    found = None
    for i, flag in enumerate(flags):
        text = None
        if flag.startswith(name + "="):
            text = flag.split("=", 1)[1]
        elif flag == name and i + 1 < len(flags):
            text = flags[i + 1]
        if text is not None:
            with contextlib.suppress(ValueError):
                found = float(text)
    return found
