"""Run a benchmark plan: one server per configuration, each point in turn, progress on stderr.

With one round, configurations run one after the other in the plan's order (one server up
at a time, so no idle server shares the cores). With several (`--rounds`), every server is
up at once and each point is measured for every contender in turn, the order rotating from
round to round, so a slow minute of a shared machine falls on all of them alike; a point's
record then holds the medians over its rounds (`pooled`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mha.bench.inprocess import batches, make_session, run_inprocess
from mha.bench.loadgen import LoadResult, LoadSpec, run_load
from mha.bench.plan import STARTED_CONFIGS, Point, Pool, Timing, build_pool
from mha.bench.servers import ServerProcess, histogram_totals, start_echo, start_server
from mha.client import Client, ClientError
from mha.proto import grpc_predict_v2_pb2 as pb

PADDING = "mha_batch_padding_fraction"


class Progress:
    """One updating line on stderr: point k of n, its label, a time bar and the count."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.label = ""
        self.started = 0.0
        self.span = 1.0
        self.tty = sys.stderr.isatty()

    def begin(self, label: str, span_s: float) -> None:
        self.index += 1
        self.label, self.span, self.started = label, span_s, time.monotonic()
        self.update(0)

    def update(self, count: int) -> None:
        done = min(1.0, (time.monotonic() - self.started) / self.span)
        bar = "#" * int(done * 20) + "-" * (20 - int(done * 20))
        line = f"[{self.index:>3}/{self.total}] [{bar}] {self.label:<34} {count:>7} answers"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)

    def end(self, summary: str) -> None:
        prefix = "\r" if self.tty else ""
        print(
            f"{prefix}[{self.index:>3}/{self.total}] {self.label:<34} {summary:<40}",
            file=sys.stderr,
            flush=True,
        )


class PlanRunner:
    """Measures a plan's points: servers started per configuration, load run per point."""

    def __init__(
        self, args: argparse.Namespace, metadata: pb.ModelMetadataResponse, local: Path | None
    ) -> None:
        self.args = args
        self.metadata = metadata
        self.local = local
        self.version = args.version
        self._pools: dict[str, Pool] = {}

    def pool(self, point: Point) -> Pool:
        key = point.workload.name
        if key not in self._pools:
            self._pools[key] = build_pool(
                self.metadata, self.args.model, self.version, point.workload, self.args.seed
            )
        return self._pools[key]

    def run_all(
        self, points: list[tuple[Point, Timing]], rounds: int = 1
    ) -> tuple[list[dict], dict[str, dict]]:
        """Measure every point; return point records and per-server facts."""
        if rounds > 1:
            return self._interleaved(points, rounds)
        progress = Progress(len(points))
        results: list[dict] = []
        servers: dict[str, dict] = {}
        for config, group in itertools.groupby(points, key=lambda pt: pt[0].config):
            todo = list(group)
            if config == "inprocess":
                results += self._inprocess(todo, progress)
            elif config == "external":
                results += [self._served(self.args.url, p, t, progress, None) for p, t in todo]
            else:
                results += self._server(config, todo, progress, servers)
        return results, servers

    def _server(
        self,
        config: str,
        todo: list[tuple[Point, Timing]],
        progress: Progress,
        servers: dict[str, dict],
    ) -> list[dict]:
        assert config in STARTED_CONFIGS and self.local is not None
        log_dir = Path(tempfile.mkdtemp(prefix="mha-bench-"))
        server = self._start(config, log_dir)
        try:
            idle_mb = server.rss_mb()
            counted = config != "echo"  # the echo keeps no statistics and has no /metrics
            results = [self._served(server.url, p, t, progress, server, counted) for p, t in todo]
            servers[config] = self._facts(server, idle_mb)
        finally:
            server.stop()
        return results

    def _interleaved(
        self, points: list[tuple[Point, Timing]], rounds: int
    ) -> tuple[list[dict], dict[str, dict]]:
        """Every server up at once; each point for every contender in turn, `rounds` times."""
        progress = Progress(len(points) * rounds)
        log_dir = Path(tempfile.mkdtemp(prefix="mha-bench-"))
        configs = dict.fromkeys(p.config for p, _ in points)
        started: dict[str, ServerProcess] = {}
        try:
            for config in configs:
                if config in STARTED_CONFIGS:
                    started[config] = self._start(config, log_dir)
            idle = {config: server.rss_mb() for config, server in started.items()}
            session = None
            if "inprocess" in configs:
                assert self.local is not None
                session = make_session(self.local / "model.onnx", self.args.threads)
            alike: dict[tuple, list[tuple[Point, Timing]]] = {}
            for point, timing in points:
                key = (point.workload, point.concurrency, point.rate, point.merge)
                alike.setdefault(key, []).append((point, timing))
            measured: dict[Point, list[dict]] = {point: [] for point, _ in points}
            for index in range(rounds):
                for group in alike.values():
                    turn = index % len(group)
                    for point, timing in group[turn:] + group[:turn]:
                        measured[point].append(self._one(point, timing, progress, started, session))
            servers = {
                config: self._facts(server, idle[config]) for config, server in started.items()
            }
        finally:
            for server in started.values():
                server.stop()
        return [pooled(measured[point]) for point, _ in points], servers

    def _one(
        self,
        point: Point,
        timing: Timing,
        progress: Progress,
        started: dict[str, ServerProcess],
        session: Any,
    ) -> dict:
        if point.config == "inprocess":
            return self._inprocess([(point, timing)], progress, session)[0]
        if point.config == "external":
            return self._served(self.args.url, point, timing, progress, None)
        server = started[point.config]
        return self._served(server.url, point, timing, progress, server, point.config != "echo")

    def _facts(self, server: ServerProcess, idle_mb: float) -> dict:
        return {
            "startup_s": server.startup_s,
            "rss_mb": server.rss_mb(),
            "rss_idle_mb": idle_mb,
            "flags": server.flags,
            "model": self.args.model,
            "log": str(server.log_path),
        }

    def _start(self, config: str, log_dir: Path) -> ServerProcess:
        assert self.local is not None
        if config == "echo":
            print("starting the echo server ...", file=sys.stderr, flush=True)
            return start_echo(self.local, log_dir=log_dir)
        extra = list(self.args.server_arg)
        if config == "on" and self.args.max_batch_delay_us is not None:
            extra += ["--max-batch-delay-us", str(self.args.max_batch_delay_us)]
        print(f"starting mha serve ({config}) ...", file=sys.stderr, flush=True)
        return start_server(
            self.local.parent.parent,
            config,
            threads=self.args.threads,
            extra=extra,
            log_dir=log_dir,
        )

    def _served(
        self,
        url: str,
        point: Point,
        timing: Timing,
        progress: Progress,
        server: ServerProcess | None,
        counters: bool = True,
    ) -> dict:
        spec = LoadSpec(
            url,
            self.pool(point).wire,
            concurrency=point.concurrency,
            rate=point.rate,
            duration_s=timing.duration_s,
            warmup_s=timing.warmup_s,
            max_requests=timing.max_requests,
            seed=self.args.seed,
            processes=self.args.client_procs,
        )
        before = self._counters(url, server) if counters else {}
        progress.begin(point.label, timing.warmup_s + timing.duration_s)
        result = run_load(spec, on_progress=progress.update)
        record = self._record(point, result)
        after = self._counters(url, server) if counters else {}
        record.update(counter_deltas(before, after))
        progress.end(_summary(record))
        return record

    def _counters(self, url: str, server: ServerProcess | None) -> dict[str, float]:
        """Samples and runs (ModelStatistics) and padding totals (/metrics) so far."""
        counters: dict[str, float] = {}
        try:
            with Client(url, timeout=5) as client:
                stats = client.statistics(self.args.model, self.version).model_stats
            counters["samples"] = sum(s.inference_count for s in stats)
            counters["runs"] = sum(s.execution_count for s in stats)
        except ClientError:
            pass  # a server without ModelStatistics: no mean batch
        if server is not None:
            with contextlib.suppress(OSError):  # no metrics endpoint: no padding fraction
                text = server.metrics()
                counters["pad_sum"], counters["pad_count"] = histogram_totals(
                    text, PADDING, self.args.model
                )
        return counters

    def _inprocess(
        self, todo: list[tuple[Point, Timing]], progress: Progress, session: Any = None
    ) -> list[dict]:
        assert self.local is not None
        if session is None:
            session = make_session(self.local / "model.onnx", self.args.threads)
        graph_inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in self.metadata.outputs if o.name != "attention_weights"]
        records = []
        for point, timing in todo:
            feeds = batches(self.pool(point).arrays, graph_inputs, point.merge, self.args.seed)
            span = timing.sweep_duration_s if point.merge > 1 else timing.duration_s
            progress.begin(point.label, timing.warmup_s + span)
            result = run_inprocess(
                session,
                feeds,
                outputs,
                concurrency=point.concurrency,
                duration_s=span,
                warmup_s=timing.warmup_s,
                max_requests=timing.max_requests,
                seed=self.args.seed,
                on_progress=progress.update,
            )
            record = self._record(point, result, per_call=point.merge)
            progress.end(_summary(record))
            records.append(record)
        return records

    def _record(self, point: Point, result: LoadResult, per_call: int = 1) -> dict[str, Any]:
        return {
            "config": point.config,
            "workload": point.workload.name,
            "concurrency": point.concurrency,
            "rate": point.rate,
            "merge": point.merge,
            "requests": result.completed * per_call,
            "sent": result.sent,
            "seconds": result.elapsed_s,
            "rps": result.throughput * per_call,
            "p50_ms": result.percentile_ms(50),
            "p90_ms": result.percentile_ms(90),
            "p99_ms": result.percentile_ms(99),
            "max_ms": result.percentile_ms(100),
            "errors": result.errors,
            "client_cpu_ms": result.client_cpu_ms,
        }


# A pooled record's figures: the median over its rounds (max_ms: the largest).
_MEDIANS = ("rps", "p50_ms", "p90_ms", "p99_ms", "seconds", "client_cpu_ms", "mean_batch",
            "padding_fraction")  # fmt: skip


def pooled(records: list[dict]) -> dict:
    """One point's rounds as one record: medians, summed counts, and each round's req/s."""
    if len(records) == 1:
        return records[0]
    record = dict(records[0])
    for key in _MEDIANS:
        values = [r[key] for r in records if r.get(key) is not None]
        record[key] = statistics.median(values) if values else None
    record["max_ms"] = max(r["max_ms"] for r in records)
    record["requests"] = sum(r["requests"] for r in records)
    record["sent"] = sum(r["sent"] for r in records)
    errors: dict[str, int] = {}
    for r in records:
        for code, count in r["errors"].items():
            errors[code] = errors.get(code, 0) + count
    record["errors"] = errors
    record["rounds"] = [r["rps"] for r in records]
    return record


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    def delta(key: str) -> float | None:
        return after[key] - before[key] if key in before and key in after else None

    runs, samples = delta("runs"), delta("samples")
    pad_sum, pad_count = delta("pad_sum"), delta("pad_count")
    return {
        "mean_batch": samples / runs if runs and samples is not None else None,
        # mean over session runs of each run's padded-token fraction
        "padding_fraction": pad_sum / pad_count if pad_count and pad_sum is not None else None,
    }


def _summary(record: dict[str, Any]) -> str:
    errors = sum(record["errors"].values())
    return (
        f"{record['rps']:8.1f} req/s  p50 {record['p50_ms']:.2f} ms  "
        f"p99 {record['p99_ms']:.2f} ms" + (f"  {errors} errors" if errors else "")
    )
