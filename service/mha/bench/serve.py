"""`mha bench serve`: load-test an Open Inference Protocol server, and this one against its bounds.

By default it starts the project's own server (`mha serve` on loopback, port 0) with
batching on, batching off and in the no-compute floor mode, and the bare echo server
(mha.bench.echo, the floor of any Python gRPC server), and runs the in-process ONNX Runtime
baseline on the same model file and request mix; --url measures an external server
instead. The contenders run one after the other, each over all its points (no
alternation per point). Writes bench.json and bench.png to --out, prints the latency,
batching and bound tables, then every target as a PASS/MISS line. Figures, not a test:
the machine may be shared, so the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mha.bench import arguments, report
from mha.bench.plan import (
    CONFIGS,
    PRESETS,
    STARTED_CONFIGS,
    Point,
    Preset,
    Timing,
    Workload,
    metadata_from_config,
    plan,
    read_config,
)
from mha.bench.run import PlanRunner
from mha.bench.servers import ServerFailed, mha_command
from mha.cli import CliError
from mha.client import Client, ClientError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to measure")
    what.add_argument("--url", help="an external OIP server (default: start this project's)")
    what.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository (default: %(default)s)",
    )
    what.add_argument(
        "--model", default="mha", help="model name (default mha: exported if missing)"
    )
    what.add_argument("--version", default="", help="model version (default: the latest)")
    what.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="latency, batching, targets (every contender where the targets are taken), "
        "full (all three, about 5.5 minutes), quick (seconds; for tests)",
    )
    what.add_argument(
        "--quick", action="store_const", const="quick", dest="preset", help="= --preset quick"
    )
    what.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    load = parser.add_argument_group("custom load (replaces the preset's)")
    load.add_argument("--workloads", help="comma-separated BxL or BxLO-HI, e.g. 1x128,1x16-256")
    load.add_argument("--concurrency", help="comma-separated closed-loop client counts")
    load.add_argument("--rate", help="comma-separated open-loop rates (requests/s, Poisson)")
    load.add_argument("--duration", type=float, help="measured seconds per point")
    load.add_argument("--warmup", type=float, help="unmeasured seconds before each point")
    load.add_argument("--max-requests", type=int, default=0, help="measured requests per point")
    load.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every point this many times, contenders interleaved point by point "
        "(every server up at once, the order rotating each round); medians are reported",
    )
    server = arguments.add_server_arguments(parser)
    server.add_argument("--max-batch-delay-us", type=int, help="passed to mha serve (batching on)")
    arguments.add_output_arguments(parser, Path("bench-out/serve"))


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
    if args.configs:
        wanted = tuple(c.strip() for c in args.configs.split(",") if c.strip())
        unknown = [c for c in wanted if c not in CONFIGS]
        if unknown:
            raise CliError(
                f"unknown --configs {', '.join(unknown)}; choose from {', '.join(CONFIGS)}"
            )
    elif args.url:
        wanted = ("external", "inprocess") if has_model_file else ("external",)
    else:
        wanted = ("on", "off", "floor", "echo", "inprocess")
    if args.url and any(c in STARTED_CONFIGS for c in wanted):
        raise CliError("--url measures an external server: --configs may be external, inprocess")
    if "inprocess" in wanted and not has_model_file:
        raise CliError(f"in-process baseline needs {args.repository}/{args.model}/<version>/")
    return wanted


def version_dir(args: argparse.Namespace) -> Path | None:
    """The model's version folder in --repository (the latest unless --version)."""
    model_dir = args.repository / args.model
    if args.version:
        found = model_dir / args.version
        return found if (found / "model.onnx").is_file() else None
    versions = sorted((int(p.name) for p in model_dir.glob("*") if p.name.isdigit()), reverse=True)
    return next(
        (model_dir / str(v) for v in versions if (model_dir / str(v) / "model.onnx").is_file()),
        None,
    )


def ensure_model(args: argparse.Namespace) -> Path:
    """The version folder, exporting the embedded default model when it is missing."""
    found = version_dir(args)
    if found is not None:
        return found
    if args.model != "mha":
        raise CliError(f"no model {args.model!r} in {args.repository}; export it first")
    print(f"exporting the default model to {args.repository} ...", file=sys.stderr)
    command = [*mha_command(), "export", "--repository", str(args.repository), "--if-missing"]
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
        raise CliError("`mha export` failed; see its output above")
    found = version_dir(args)
    if found is None:
        raise CliError(f"export did not produce {args.repository}/{args.model}/<version>")
    return found


def run(args: argparse.Namespace) -> int:
    local = version_dir(args) if args.url else ensure_model(args)
    if args.url:
        try:
            with Client(args.url, timeout=10) as client:
                metadata = client.model_metadata(args.model, args.version)
        except ClientError as err:
            raise CliError(f"{args.url}: {err}") from None
    else:
        assert local is not None
        metadata = metadata_from_config(read_config(local))
    if args.rounds < 1:
        raise CliError(f"--rounds {args.rounds}: need at least 1")
    chosen = presets(args)
    points: list[tuple[Point, Timing]] = plan(chosen, configs(args, local is not None))
    args.out.mkdir(parents=True, exist_ok=True)
    runner = PlanRunner(args, metadata, local)
    started, load_before = time.time(), os.getloadavg()
    try:
        results, servers = runner.run_all(points, args.rounds)
    except (ServerFailed, RuntimeError) as err:  # a server that died, a load generator that did
        raise CliError(str(err)) from None
    document: dict[str, Any] = {
        "preset": args.preset,
        "rounds": args.rounds,
        "started": started,
        "seconds": time.time() - started,
        "machine": arguments.machine(load_before),
        "model": {
            "name": args.model,
            "dir": str(local) if local else None,
            "url": args.url,
            "inputs": [t.name for t in metadata.inputs],
        },
        "servers": servers,
        "points": results,
    }
    document["targets"] = print_tables(document, chosen)
    report.write_json(args.out / "bench.json", document)
    if not args.no_plot:
        write_plot(document, args.out / "bench.png")
    print(f"\nwrote {args.out / 'bench.json'}" + ("" if args.no_plot else " and bench.png"))
    failed = sum(sum(p["errors"].values()) for p in results)
    if failed:
        print(f"mha bench serve: {failed} requests failed (see errors above)", file=sys.stderr)
    return 1 if failed else 0


def print_tables(document: dict[str, Any], chosen: tuple[Preset, ...]) -> list[dict]:
    """Print every table, then the targets as PASS/MISS lines; return the targets."""
    points, targets = document["points"], []
    load = document["machine"]
    print(
        f"\nall points (load average before {load['loadavg_before'][0]:.2f}, "
        f"after {load['loadavg_after'][0]:.2f}; shared machine)"
    )
    print(report.points_table(points))
    by_name = {p.name: p for p in chosen}
    if "latency" in by_name:
        text, found = report.latency_report(points, by_name["latency"].workloads)
        print("\nend-to-end latency and throughput\n" + text)
        targets += found
    if "batching" in by_name:
        c32 = by_name["batching"].concurrency[0]
        text, found = report.batching_report(points, by_name["batching"].workloads, concurrency=c32)
        print(f"\nbatching on vs off, {c32} clients\n" + text)
        targets += found
    if document["servers"]:
        text, found = report.servers_table(document["servers"])
        print("\nserving process\n" + text)
        targets += found
    goals = next((p.goals for p in chosen if p.goals is not None), None)
    if goals is not None:
        clients = goals.bound_clients
        print(
            f"\nagainst the echo server and the bound 1 / (1/echo + 1/in-process), req/s at "
            f"{clients} clients, p50 at 1\n" + report.bound_table(points, goals.shapes, clients)
        )
        document["bounds"] = report.bounds(points, goals.shapes, clients)
        targets += report.goal_targets(points, goals)
    for t in targets:
        t["verdict"] = report.pass_miss(t["ok"])
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
        print(f"mha bench serve: no plot: {err}", file=sys.stderr)
