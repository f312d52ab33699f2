"""`mha bench soak`: minutes of steady mixed load; does memory grow, does latency drift?

By default it starts `mha serve` (batching on) on a repository holding the embedded default
model and a KV-cache model of its size (`mha export --kv-cache`, exported when missing, as
`mha bench decode` names it; --cross adds `mha bench memory`'s cross-attention pair), and
drives every model it finds there (mha.bench.soak_load): stateless requests of several
(B, L), decode sequences with sequence_start/sequence_end, memory sequences. --url
measures a running server (its VmRSS with --server-pid). Every --interval seconds it
samples the server's VmRSS and the latency of the interval.

Prints VmRSS over time, the p99 drift (last interval vs the first after the warm-up) and
a verdict; exits 1 when any request failed or VmRSS grew more than --max-rss-growth after
the warm-up, 2 when the server could not be started or died. The machine may be shared:
the JSON and the tables carry the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mha.bench import arguments, decode_models, memory_models, report, soak_report
from mha.bench.flood import shape
from mha.bench.flood_load import FloodFailed
from mha.bench.flood_server import (
    DEFAULT_MODEL,
    Target,
    add_target_arguments,
    ensure_default_model,
    open_target,
)
from mha.bench.soak_load import Interval, Plan, Role, roles_in, soak
from mha.client import Client, ClientError
from mha.errors import CliError
from mha.tables import cell

SIZE = (512, 8)  # the embedded default model's d_model and heads
SHAPES = "1x16,1x128,4x64,8x128,2x256"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    what.add_argument(
        "--requests",
        type=int,
        default=0,
        metavar="N",
        help="stop after N requests even before --minutes (0 = no bound)",
    )
    what.add_argument(
        "--interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between VmRSS samples (default 5)",
    )
    what.add_argument(
        "--warmup-seconds",
        type=float,
        metavar="S",
        help="not judged (default: a fifth of the run, at most 60 s)",
    )
    what.add_argument("--concurrency", type=int, default=8, help="workers (default 8)")
    what.add_argument(
        "--shapes",
        default=SHAPES,
        help=f"BxL of stateless requests, comma-separated (default {SHAPES})",
    )
    what.add_argument("--models", help="comma-separated subset of the repository's models")
    what.add_argument(
        "--export",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the default and KV-cache models when missing (default on)",
    )
    what.add_argument(
        "--cross",
        action="store_true",
        help="also export the cross-attention memory and stateless cross models",
    )
    what.add_argument(
        "--max-rss-growth",
        type=float,
        default=0.05,
        help="VmRSS growth after the warm-up that fails the soak (default 0.05)",
    )
    what.add_argument("--timeout", type=float, default=30.0, help="every request's deadline, s")
    what.add_argument("--seed", type=int, default=0)
    add_target_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out/soak"),
        help="folder for bench.json and bench.md (default: %(default)s)",
    )


def plan_numbers(args: argparse.Namespace) -> tuple[float, float]:
    """(duration s, warm-up s), checked."""
    duration = args.minutes * 60
    if duration <= 0 or args.interval <= 0 or args.concurrency < 1 or args.requests < 0:
        raise CliError("--minutes and --interval must be > 0, --concurrency >= 1, --requests >= 0")
    warmup = args.warmup_seconds if args.warmup_seconds is not None else min(60, duration / 5)
    return duration, max(0.0, warmup)


def export_models(repository: Path, cross: bool) -> list[str]:
    """The default model, a KV-cache model of its size (and the cross pair): notes on gaps."""
    ensure_default_model(repository)
    absent = [m for m in decode_models.EXPORT_EXTRA if importlib.util.find_spec(m) is None]
    if absent:
        return [f"no KV-cache model exported (the export extra is missing: {', '.join(absent)})"]
    kv, _ = decode_models.model_names(*SIZE)
    if not (repository / kv / decode_models.VERSION / "model.onnx").is_file():
        decode_models.export(repository, kv, ("--kv-cache",), *SIZE)
    if cross:
        memory_models.ensure_models(repository, *SIZE)
    return []


def roles_from(args: argparse.Namespace, repository: Path, target: Target) -> list[Role]:
    """The models to drive: the repository's, or (--url alone) --models via ModelMetadata."""
    wanted = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if args.repository or not args.url:  # the server's own repository
        roles = [r for r in roles_in(repository) if not wanted or r.model in wanted]
    else:
        roles = [metadata_role(target.url, name) for name in wanted or [DEFAULT_MODEL]]
    if not roles:
        raise CliError(
            f"no models to drive in {repository}" + (f" among {wanted}" if wanted else "")
        )
    return roles


def metadata_role(url: str, name: str) -> Role:
    """A stateless role from ModelMetadata (sequence models need their mha.json)."""
    try:
        with Client(url, timeout=10) as client:
            metadata = client.model_metadata(name)
    except ClientError as err:
        raise CliError(f"{url}: model {name!r}: {err}") from None
    dims = {t.name: t for t in metadata.inputs}
    query = dims["query"]
    cross = "key" in dims
    kdim = int(dims["key"].shape[2]) if cross else int(query.shape[2])
    vdim = int(dims["value"].shape[2]) if cross else int(query.shape[2])
    return Role("cross" if cross else "self", name, int(query.shape[2]), kdim, vdim, query.datatype)


def progress(interval: Interval) -> None:
    """One line on stderr per closed interval."""
    p99_ms = soak_report.percentile_ms(interval.latencies, 99)
    p99 = f"{p99_ms:.1f}" if p99_ms is not None else "-"
    rss = f"{interval.rss_mb:.0f}" if interval.rss_mb is not None else "-"
    failed = sum(interval.failures.values())
    say(
        f"{interval.end_s:7.1f} s  VmRSS {rss} MB  {len(interval.latencies)} OK  p99 {p99} ms"
        + (f"  {failed} FAILED" if failed else "")
    )


def shapes_from(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(shape(s) for s in args.shapes.split(",") if s.strip())
    except argparse.ArgumentTypeError as err:
        raise CliError(f"--shapes: {err}") from None


def run(args: argparse.Namespace) -> int:
    duration, warmup = plan_numbers(args)
    shapes = shapes_from(args)
    repository = args.repository or args.out / "models"
    notes = export_models(repository, args.cross) if args.export and not args.url else []
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    target = open_target(args, repository, [])
    try:
        roles = roles_from(args, repository, target)
        if "decode" not in {r.kind for r in roles}:
            notes.append("no KV-cache model: no decode sequences")
        say(f"soak: {', '.join(f'{r.model} ({r.kind})' for r in roles)}; "
            f"{args.concurrency} workers for {duration:g} s")  # fmt: skip
        plan = Plan(target.url, tuple(roles), shapes, args.concurrency, duration, args.interval,
                    args.requests, args.timeout, args.seed)  # fmt: skip
        rss_start = target.rss_mb()
        intervals = soak(plan, target.rss_mb, progress)
        target.check_alive()
    except FloodFailed as err:
        raise CliError(str(err)) from None
    finally:
        target.stop()
    document: dict[str, Any] = {
        "started": started,
        "seconds": time.time() - started,
        "machine": arguments.machine(load_before),
        "server": target.record(),
        "plan": {"duration_s": duration, "warmup_s": warmup, "interval_s": args.interval,
                 "concurrency": args.concurrency, "max_requests": args.requests,
                 "shapes": [f"{b}x{length}" for b, length in shapes], "seed": args.seed},
        "roles": [asdict(r) for r in roles],
        "notes": notes,
        "rss_start_mb": rss_start,
        **figures(intervals, warmup, args.max_rss_growth),
    }  # fmt: skip
    return report_and_verdict(document, args.out)


def figures(intervals: list[Interval], warmup: float, max_growth: float) -> dict[str, Any]:
    """The measured part of bench.json: intervals, per-kind figures, drift, verdict."""
    records = [soak_report.interval_record(i, warmup) for i in intervals]
    return {
        "intervals": records,
        "kinds": soak_report.kinds_record(intervals, warmup),
        "failure_details": soak_report.failure_details(intervals),
        "p99_drift": soak_report.p99_drift(records),
        "verdict": soak_report.verdict(records, max_growth),
    }


def report_and_verdict(document: dict[str, Any], out: Path) -> int:
    """Print the tables, write bench.json and bench.md; the exit status of the verdict."""
    (out / "bench.md").write_text(tables(document, max_rows=None) + "\n")
    print("\n" + tables(document, max_rows=soak_report.MAX_ROWS_PRINTED))
    report.write_json(out / "bench.json", document)
    print(f"\nwrote {out / 'bench.json'} and bench.md")
    if not document["verdict"]["ok"]:
        say(f"mha bench soak: FAIL: {'; '.join(document['verdict']['reasons'])}")
        return 1
    return 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def tables(document: dict[str, Any], max_rows: int | None) -> str:
    """Every table as Markdown (the RSS table cut to max_rows rows when given)."""
    heading = report.load_heading("mha bench soak", document["machine"]).strip()
    roles = ", ".join(f"{r['model']} ({r['kind']})" for r in document["roles"])
    plan = document["plan"]
    sections = [
        f"# {heading}",
        f"{roles}; {plan['concurrency']} workers, {plan['duration_s']:g} s, warm-up "
        f"{plan['warmup_s']:g} s; VmRSS at the start {cell(document['rss_start_mb'])} MB",
        *document["notes"],
        "## VmRSS and latency over time",
        soak_report.rss_table(document["intervals"], max_rows),
        "## per workload, after the warm-up",
        soak_report.kinds_table(document["kinds"]),
        "## summary",
        soak_report.summary_table(document),
    ]
    details = document["failure_details"]
    if details:
        rows = "\n".join(f"{n:>6}  {text}" for text, n in list(details.items())[:10])
        sections += ["## failures", rows]
    return "\n\n".join(sections)
