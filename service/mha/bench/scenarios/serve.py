"""`mha bench serve`: load-test an Open Inference Protocol server, and this one against its bounds.

By default it starts the project's own server (`mha serve` on loopback, port 0) with
batching on, batching off and in the no-compute floor mode, and the bare echo server (the
floor of any Python gRPC server), and runs the in-process ONNX Runtime baseline on the
same model file and request mix; --url measures an external server instead. With one
round the contenders run one after the other, each over all its points, one server up at
a time; with --rounds N every server is up at once and each point is measured for every
contender in turn, the order rotating (mha.bench.framework.rounds), and a point's record
holds the medians over its rounds (`pooled`). Writes bench.json and bench.png to --out,
prints the latency, batching and bound tables, then every target as a PASS/MISS line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mha.bench.framework import models, options, probes, report
from mha.bench.framework.contenders import ECHO_PROCESSES, Contenders, Server, ServerFailed
from mha.bench.framework.inprocess import batches, make_session, run_inprocess
from mha.bench.framework.rounds import schedule
from mha.bench.framework.unary import LoadResult, LoadSpec, run_load
from mha.bench.scenarios import bounds, frontends
from mha.bench.scenarios.points import (
    CONFIGS,
    FRONTEND_CONFIGS,
    PRESETS,
    STARTED_CONFIGS,
    Point,
    Pool,
    Preset,
    Timing,
    Workload,
    build_pool,
    plan,
)
from mha.client import Client, ClientError
from mha.errors import CliError
from mha.proto import grpc_predict_v2_pb2 as pb

WHAT: tuple[options.Flag, ...] = (
    ("--url", dict(help="an external OIP server (default: start this project's)")),
    ("--repository", dict(type=Path, default=Path("models"),
                          help="model repository (default: %(default)s)")),
    ("--model", dict(default="mha", help="model name (default mha: exported if missing)")),
    ("--version", dict(default="", help="model version (default: the latest)")),
    ("--preset", dict(choices=sorted(PRESETS), default="full",
                      help="latency, batching, targets (every contender where the targets are "
                      "taken), full (all three, about 5.5 minutes), quick (seconds; for tests), "
                      "frontends (--frontends 1, 2 and the default, the echo x1 and x2; "
                      "about 1.5 minutes)")),
    ("--quick", dict(action="store_const", const="quick", dest="preset", help="= --preset quick")),
    ("--configs", dict(help=f"comma-separated subset of {', '.join(CONFIGS)}")),
)  # fmt: skip
LOAD: tuple[options.Flag, ...] = (
    ("--workloads", dict(help="comma-separated BxL or BxLO-HI, e.g. 1x128,1x16-256")),
    ("--concurrency", dict(help="comma-separated closed-loop client counts")),
    ("--rate", dict(help="comma-separated open-loop rates (requests/s, Poisson)")),
    ("--duration", dict(type=float, help="measured seconds per point")),
    ("--warmup", dict(type=float, help="unmeasured seconds before each point")),
    ("--max-requests", dict(type=int, default=0, help="measured requests per point")),
    ("--client-procs", dict(type=int, default=1, help="load-generator processes")),
    ("--connections", dict(type=int, help="closed loop: connections the clients spread over "
                           "(default 1; the frontends preset: one per client, since frontends "
                           "share connections, not calls)")),
    ("--seed", dict(type=int, default=0)),
    ("--rounds", dict(type=int, default=1,
                      help="measure every point this many times, contenders interleaved point "
                      "by point (every server up at once, the order rotating each round); "
                      "medians are reported")),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_flags(parser.add_argument_group("what to measure"), WHAT)
    options.add_flags(parser.add_argument_group("custom load (replaces the preset's)"), LOAD)
    server = options.add_server_arguments(parser)
    server.add_argument("--max-batch-delay-us", type=int, help="passed to mha serve (batching on)")
    options.add_output_arguments(parser, Path("bench-out/serve"))


def presets(args: argparse.Namespace) -> tuple[Preset, ...]:
    """The preset's measurements, with any custom load or timing laid over them."""
    chosen = PRESETS[args.preset]
    if args.workloads or args.concurrency or args.rate:
        try:
            workloads = tuple(
                Workload.parse(w).name for w in (args.workloads or "1x128").split(",")
            )
            rates = tuple(float(r) for r in args.rate.split(",")) if args.rate else ()
            clients = args.concurrency or ("" if rates else "1")
            concurrency = tuple(int(c) for c in clients.split(",") if c)
        except ValueError as err:
            raise CliError(str(err)) from None
        if any(c < 1 for c in concurrency) or any(r <= 0 for r in rates):
            raise CliError("--concurrency and --rate values must be positive")
        chosen = (Preset("custom", workloads, concurrency, configs=CONFIGS, rates=rates),)
    timing = {
        k: v for k, v in (("duration_s", args.duration), ("warmup_s", args.warmup)) if v is not None
    }
    if args.max_requests:
        timing["max_requests"] = args.max_requests
    return tuple(replace(p, timing=replace(p.timing, **timing)) for p in chosen)


def configs(args: argparse.Namespace, has_model_file: bool) -> tuple[str, ...]:
    default = ("external", "inprocess") if has_model_file else ("external",)
    wanted = options.chosen(args.configs, CONFIGS, "--configs")
    if not args.configs:
        wanted = default if args.url else ("on", "off", "floor", "echo", "inprocess")
        if args.preset == "frontends" and not args.url:
            wanted = FRONTEND_CONFIGS
    if args.url and any(c in STARTED_CONFIGS for c in wanted):
        raise CliError("--url measures an external server: --configs may be external, inprocess")
    if "inprocess" in wanted and not has_model_file:
        raise CliError(f"in-process baseline needs {args.repository}/{args.model}/<version>/")
    return wanted


class Progress:
    """One updating line on stderr: point k of n, its label, a time bar and the count."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.label = total, 0, ""
        self.started, self.span, self.tty = 0.0, 1.0, sys.stderr.isatty()

    def begin(self, label: str, span_s: float) -> None:
        self.index += 1
        self.label, self.span, self.started = label, span_s, time.monotonic()
        self.update(0)

    def update(self, count: int) -> None:
        done = int(20 * min(1.0, (time.monotonic() - self.started) / self.span))
        line = f"[{self.index:>3}/{self.total}] [{'#' * done}{'-' * (20 - done)}] {self.label:<34}"
        if self.tty:
            print(f"\r{line} {count:>7} answers", end="", file=sys.stderr, flush=True)

    def end(self, record: dict[str, Any]) -> None:
        errors = sum(record["errors"].values())
        summary = (
            f"{record['rps']:8.1f} req/s  p50 {record['p50_ms']:.2f} ms  "
            f"p99 {record['p99_ms']:.2f} ms" + (f"  {errors} errors" if errors else "")
        )
        prefix = "\r" if self.tty else ""
        report.say(f"{prefix}[{self.index:>3}/{self.total}] {self.label:<34} {summary:<40}")


class PlanRunner:
    """Measures a plan's points, starting each contender's server when its turn comes."""

    def __init__(
        self,
        args: argparse.Namespace,
        metadata: pb.ModelMetadataResponse,
        local: Path | None,
        contenders: Contenders,
    ) -> None:
        self.args, self.metadata, self.local, self.contenders = args, metadata, local, contenders
        self._pools: dict[str, Pool] = {}
        self.servers: dict[str, dict] = {}
        self.idle: dict[str, float | None] = {}
        self.session: Any = None

    def pool(self, point: Point) -> Pool:
        key = point.workload.name
        if key not in self._pools:
            self._pools[key] = build_pool(
                self.metadata, self.args.model, self.args.version, point.workload, self.args.seed
            )
        return self._pools[key]

    def run_all(self, points: list[tuple[Point, Timing]], rounds: int) -> list[dict]:
        """Every point, `rounds` times; one record per point (pooled over its rounds)."""
        timing = dict(points)
        by_config: dict[str, list[Point]] = {}
        for point, _ in points:
            by_config.setdefault(point.config, []).append(point)
        alike = {c: [self._alike(p) for p in ps] for c, ps in by_config.items()}
        order = schedule(list(by_config), alike.__getitem__, rounds, one_at_a_time=True)
        progress = Progress(len(order))
        measured: dict[Point, list[dict]] = {point: [] for point, _ in points}
        for _, config, key in order:
            point = next(p for p in by_config[config] if self._alike(p) == key)
            measured[point].append(self._one(point, timing[point], progress, rounds == 1))
        self._keep_facts()
        return [pooled(measured[point]) for point, _ in points]

    @staticmethod
    def _alike(point: Point) -> tuple:
        return (point.workload, point.concurrency, point.rate, point.merge)

    def _one(self, point: Point, timing: Timing, progress: Progress, alone: bool) -> dict:
        if point.config == "inprocess":
            return self._inprocess(point, timing, progress)
        if point.config == "external":
            return self._served(Server(self.args.url), point, timing, progress)
        return self._served(self._server(point.config, alone), point, timing, progress)

    def _server(self, config: str, alone: bool) -> Server:
        """The configuration's server, started on first use (alone: the others stopped)."""
        if config in self.contenders.started:
            return self.contenders.started[config]
        if alone:
            self._keep_facts()
            self.contenders.stop_all()
        assert self.local is not None
        if config in ECHO_PROCESSES:
            server = self.contenders.echo(self.local, config, ECHO_PROCESSES[config])
        else:
            extra = []
            if config == "on" and self.args.max_batch_delay_us is not None:
                extra = ["--max-batch-delay-us", str(self.args.max_batch_delay_us)]
            server = self.contenders.serve(config, self.local.parent.parent, config, extra)
        self.idle[config] = server.rss_mb()
        return server

    def _keep_facts(self) -> None:
        for config, server in self.contenders.started.items():
            self.servers[config] = server.record(
                rss_idle_mb=self.idle[config], model=self.args.model
            )

    def _served(self, server: Server, point: Point, timing: Timing, progress: Progress) -> dict:
        spec = LoadSpec(
            server.url,
            self.pool(point).wire,
            concurrency=point.concurrency,
            rate=point.rate,
            duration_s=timing.duration_s,
            warmup_s=timing.warmup_s,
            max_requests=timing.max_requests,
            seed=self.args.seed,
            processes=self.args.client_procs,
            connections=self.args.connections
            or (point.concurrency if self.args.preset == "frontends" else 1),
        )
        # the echo keeps no statistics and has no /metrics
        counted = point.config not in ECHO_PROCESSES
        before = self._counters(server) if counted else {}
        progress.begin(point.label, timing.warmup_s + timing.duration_s)
        record = self._record(point, run_load(spec, on_progress=progress.update))
        after = self._counters(server) if counted else {}
        change = probes.deltas(before, after)
        record.update(mean_batch=change["mean_batch"], padding_fraction=change["padding_fraction"])
        progress.end(record)
        return record

    def _counters(self, server: Server) -> dict[str, float]:
        """Samples and runs (ModelStatistics) and padding totals (/metrics) so far."""
        counters: dict[str, float] = {}
        with contextlib.suppress(ClientError), Client(server.url, timeout=5) as client:
            stats = client.statistics(self.args.model, self.args.version).model_stats
            counters["samples"] = sum(s.inference_count for s in stats)
            counters["runs"] = sum(s.execution_count for s in stats)
        text = server.metrics()  # no metrics endpoint: no padding fraction
        if text is not None:
            counters["pad_sum"], counters["pad_count"] = probes.histogram_totals(
                text, probes.PADDING, self.args.model
            )
        return counters

    def _inprocess(self, point: Point, timing: Timing, progress: Progress) -> dict:
        assert self.local is not None
        if self.session is None:
            self.session = make_session(self.local / "model.onnx", self.args.threads)
        graph_inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.metadata.outputs if o.name != "attention_weights"]
        feeds = batches(self.pool(point).arrays, graph_inputs, point.merge, self.args.seed)
        span = timing.sweep_duration_s if point.merge > 1 else timing.duration_s
        progress.begin(point.label, timing.warmup_s + span)
        result = run_inprocess(
            self.session,
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
        progress.end(record)
        return record

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
            "refused": result.refused,
            "client_cpu_ms": result.client_cpu_ms,
        }


# A pooled record's figures: the median over its rounds (max_ms: the largest).
_MEDIANS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "seconds",
    "client_cpu_ms",
    "mean_batch",
    "padding_fraction",
)


def pooled(records: list[dict]) -> dict:
    """One point's rounds as one record: medians, summed counts, and each round's req/s."""
    if len(records) == 1:
        return records[0]
    record = dict(records[0])
    for key in _MEDIANS:
        values = [r[key] for r in records if r.get(key) is not None]
        record[key] = statistics.median(values) if values else None
    record["max_ms"] = max(r["max_ms"] for r in records)
    for key in ("requests", "sent", "refused"):
        record[key] = sum(r[key] for r in records)
    errors: dict[str, int] = {}
    for r in records:
        for code, count in r["errors"].items():
            errors[code] = errors.get(code, 0) + count
    record["errors"], record["rounds"] = errors, [r["rps"] for r in records]
    return record


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise CliError(f"--rounds {args.rounds}: need at least 1")
    if args.url:
        local = models.version_dir(args.repository, args.model, args.version)
        try:
            with Client(args.url, timeout=10) as client:
                metadata = client.model_metadata(args.model, args.version)
        except ClientError as err:
            raise CliError(f"{args.url}: {err}") from None
    else:
        local = models.default_model(args.repository, args.model, args.version)
        metadata = models.metadata_from_config(models.read_config(local))
    chosen = presets(args)
    points = plan(chosen, configs(args, local is not None))
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    try:
        with Contenders(args.out / "logs", args.threads, args.server_arg) as contenders:
            runner = PlanRunner(args, metadata, local, contenders)
            results = runner.run_all(points, args.rounds)
    except (ServerFailed, RuntimeError) as err:  # a server that died, a load generator that did
        raise CliError(str(err)) from None
    document: dict[str, Any] = {
        "preset": args.preset,
        "rounds": args.rounds,
        **report.run_record(started, load_before),
        "model": {
            "name": args.model,
            "dir": str(local) if local else None,
            "url": args.url,
            "inputs": [t.name for t in metadata.inputs],
        },
        "servers": runner.servers,
        "points": results,
    }
    document["targets"] = print_tables(document, chosen)
    report.write(
        args.out, document, plot=None if args.no_plot else lambda p: write_plot(document, p)
    )
    failed = sum(sum(p["errors"].values()) for p in results)
    if failed:
        report.say(f"mha bench serve: {failed} requests failed (see errors above)")
    return 1 if failed else 0


def print_tables(document: dict[str, Any], chosen: tuple[Preset, ...]) -> list[dict]:
    """Print every table, then the targets as PASS/MISS lines; return the targets."""
    points, targets, load = document["points"], [], document["machine"]
    print(
        f"\nall points (load average before {load['loadavg_before'][0]:.2f}, "
        f"after {load['loadavg_after'][0]:.2f}; shared machine)"
    )
    print(bounds.points_table(points))
    by_name = {p.name: p for p in chosen}
    if "latency" in by_name:
        text, found = bounds.latency_report(points, by_name["latency"].workloads)
        print("\nend-to-end latency and throughput\n" + text)
        targets += found
    if "batching" in by_name:
        clients = by_name["batching"].concurrency[0]
        text, found = bounds.batching_report(points, by_name["batching"].workloads, clients)
        print(f"\nbatching on vs off, {clients} clients\n" + text)
        targets += found
    if "frontends" in by_name:
        from mha.service.frontends.supervisor import default_frontends

        count = default_frontends()
        text, found = frontends.report(points, count)
        print(f"\nfrontends before one engine (the default here: {count}), "
              f"{frontends.CLIENTS} clients\n" + text)  # fmt: skip
        targets += found
    if document["servers"]:
        text, found = bounds.servers_table(document["servers"])
        print("\nserving process\n" + text)
        targets += found
    goals = next((p.goals for p in chosen if p.goals is not None), None)
    if goals is not None:
        clients = goals.bound_clients
        print(
            f"\nagainst the echo server and the bound 1 / (1/echo + 1/in-process), req/s at "
            f"{clients} clients, p50 at 1\n" + bounds.bound_table(points, goals.shapes, clients)
        )
        document["bounds"] = bounds.bounds(points, goals.shapes, clients)
        targets += bounds.goal_targets(points, goals)
    if targets:
        print(report.load_heading("targets", load))
        print(report.target_lines(targets))
    return targets


def write_plot(document: dict[str, Any], path: Path) -> None:
    """Latency vs throughput per workload; in-process runs that merged requests left out."""
    from mha.client.plot import PlotUnavailable, latency_throughput

    panels: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    ordered = sorted(document["points"], key=lambda p: (p["rate"], p["concurrency"]))
    ordered.sort(key=lambda p: p["config"] == "inprocess")  # stable: served configs first
    for p in ordered:
        if p["requests"] and p.get("merge", 1) == 1:
            label = p["config"] + (" open loop" if p["rate"] else "")
            series = panels.setdefault(p["workload"], {}).setdefault(label, [])
            series.append((p["rps"], p["p50_ms"], p["p99_ms"]))
    try:
        latency_throughput(panels, path, title=f"mha bench serve ({document['preset']})")
    except PlotUnavailable as err:
        report.say(f"mha bench serve: no plot: {err}")
