"""`mha bench soak`: minutes of steady mixed load; does memory grow, does latency drift?

By default it starts `mha serve` (batching on) on a repository holding the embedded default
model and a KV-cache model of its size (`mha export --kv-cache`, exported when missing, as
`mha bench decode` names it; --cross adds `mha bench memory`'s cross-attention pair), and
drives every model it finds there (mha.bench.framework.mix): stateless requests of several
(B, L), decode sequences with sequence_start/sequence_end, memory sequences. --url
measures a running server (its VmRSS with --server-pid). Every --interval seconds it
samples the server's VmRSS and the latency of the interval.

Prints VmRSS over time, the p99 drift (last interval vs the first after the warm-up) and
a verdict; exits 1 when any request failed or VmRSS grew more than --max-rss-growth after
the warm-up, 2 when the server could not be started or died. Growth is the trend of every
sample after the warm-up (a Theil-Sen slope, mha.bench.framework.trend) times the span it
covers, over the fitted level at its start: it fails when that is over the bound and its
95% interval excludes no growth, so a plateau whose samples swing passes and a steady climb
fails. The p99 drift is reported, not judged: one busy spell of a shared machine moves it.
--leak-mb-per-s runs the same server with a leak (mha.bench.framework.leak), to see the
verdict catch one.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mha.bench.framework import models, options, report
from mha.bench.framework.contenders import Contenders, Server, ServerFailed, given_or_started
from mha.bench.framework.mix import Interval, Plan, Role, roles_in, run_mix
from mha.bench.framework.report import Row, percentile_ms, say, table
from mha.bench.framework.trend import theil_sen
from mha.bench.framework.unary import NoConnection
from mha.client import Client, ClientError
from mha.errors import CliError
from mha.tables import cell

SIZE = (512, 8)  # the embedded default model's d_model and heads
SHAPES = "1x16,1x128,4x64,8x128,2x256"
MAX_ROWS_PRINTED = 30  # of the RSS-over-time table; bench.md has every row


FLAGS: tuple[options.Flag, ...] = (
    ("--minutes", dict(type=float, default=10.0, help="how long (default 10)")),
    ("--requests", dict(type=int, default=0, metavar="N",
                        help="stop after N requests even before --minutes (0 = no bound)")),
    ("--interval", dict(type=float, default=5.0, metavar="S",
                        help="seconds between VmRSS samples (default 5)")),
    ("--warmup-seconds", dict(type=float, metavar="S",
                              help="not judged (default: a fifth of the run, at most 60 s)")),
    ("--concurrency", dict(type=int, default=8, help="workers (default 8)")),
    ("--shapes", dict(default=SHAPES,
                      help=f"BxL of stateless requests, comma-separated (default {SHAPES})")),
    ("--models", dict(help="comma-separated subset of the repository's models")),
    ("--export", dict(action=argparse.BooleanOptionalAction, default=True,
                      help="export the default and KV-cache models when missing (default on)")),
    ("--cross", dict(action="store_true",
                     help="also export the cross-attention memory and stateless cross models")),
    ("--max-rss-growth", dict(type=float, default=0.05,
                              help="VmRSS growth after the warm-up that fails the soak "
                              "(default 0.05)")),
    ("--timeout", dict(type=float, default=30.0, help="every request's deadline, s")),
    ("--seed", dict(type=int, default=0)),
    ("--leak-mb-per-s", dict(type=float, default=0.0, metavar="MB",
                             help="test support: the server holds this many MB more each "
                             "second (a leak the verdict must catch; not with --url)")),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    options.add_flags(what, FLAGS)
    options.add_existing_server_arguments(parser)
    options.add_output_arguments(parser, Path("bench-out/soak"), plot=False)


def plan_numbers(args: argparse.Namespace) -> tuple[float, float]:
    """(duration s, warm-up s), checked."""
    duration = args.minutes * 60
    if duration <= 0 or args.interval <= 0 or args.concurrency < 1 or args.requests < 0:
        raise CliError("--minutes and --interval must be > 0, --concurrency >= 1, --requests >= 0")
    warmup = args.warmup_seconds if args.warmup_seconds is not None else min(60, duration / 5)
    return duration, max(0.0, warmup)


def export_models(repository: Path, cross: bool) -> list[str]:
    """The default model, a KV-cache model of its size (and the cross pair): notes on gaps."""
    models.default_model(repository)
    if models.missing_extra():
        absent = ", ".join(models.missing_extra())
        return [f"no KV-cache model exported (the export extra is missing: {absent})"]
    [kv, _] = models.DECODE_PAIR.names(*SIZE)
    if not (repository / kv / models.VERSION / "model.onnx").is_file():
        models.export(repository, kv, ("--kv-cache",), *SIZE)
    if cross:
        models.ensure_pair(models.MEMORY_PAIR, repository, *SIZE)
    return []


def roles_from(args: argparse.Namespace, repository: Path, target: Server) -> list[Role]:
    """The models to drive: the repository's, or (--url alone) --models via ModelMetadata."""
    wanted = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if args.repository or not args.url:  # the server's own repository
        roles = [r for r in roles_in(repository) if not wanted or r.model in wanted]
    else:
        roles = [metadata_role(target.url, name) for name in wanted or [models.DEFAULT_MODEL]]
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
    p99_ms = percentile_ms(interval.latencies, 99)
    p99 = f"{p99_ms:.1f}" if p99_ms is not None else "-"
    rss = f"{interval.rss_mb:.0f}" if interval.rss_mb is not None else "-"
    failed = sum(interval.failures.values())
    say(
        f"{interval.end_s:7.1f} s  VmRSS {rss} MB  {len(interval.latencies)} OK  p99 {p99} ms"
        + (f"  {interval.refused} refusals sent again" if interval.refused else "")
        + (f"  {failed} FAILED" if failed else "")
    )


def shapes_from(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(options.shape(s) for s in args.shapes.split(",") if s.strip())
    except argparse.ArgumentTypeError as err:
        raise CliError(f"--shapes: {err}") from None


def run(args: argparse.Namespace) -> int:
    duration, warmup = plan_numbers(args)
    shapes = shapes_from(args)
    if args.leak_mb_per_s and args.url:
        raise CliError("--leak-mb-per-s needs a server started here, not --url")
    repository = args.repository or args.out / "models"
    notes = export_models(repository, args.cross) if args.export and not args.url else []
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    try:
        with Contenders(args.out / "logs", args.threads, args.server_arg) as contenders:
            target = given_or_started(
                args, contenders, repository, leak_mb_per_s=args.leak_mb_per_s
            )
            roles = roles_from(args, repository, target)
            if "decode" not in {r.kind for r in roles}:
                notes.append("no KV-cache model: no decode sequences")
            say(
                f"soak: {', '.join(f'{r.model} ({r.kind})' for r in roles)}; "
                f"{args.concurrency} workers for {duration:g} s"
            )
            plan = Plan(
                target.url,
                tuple(roles),
                shapes,
                args.concurrency,
                duration,
                args.interval,
                args.requests,
                args.timeout,
                args.seed,
            )
            rss_start = target.rss_mb()
            intervals = run_mix(plan, target.rss_mb, progress)
            target.check_alive()
            server = target.record(leak_mb_per_s=args.leak_mb_per_s or None)
    except (NoConnection, ServerFailed) as err:
        raise CliError(str(err)) from None
    document: dict[str, Any] = {
        **report.run_record(started, load_before),
        "server": server,
        "plan": {
            "duration_s": duration,
            "warmup_s": warmup,
            "interval_s": args.interval,
            "concurrency": args.concurrency,
            "max_requests": args.requests,
            "shapes": [f"{b}x{length}" for b, length in shapes],
            "seed": args.seed,
        },
        "roles": [asdict(r) for r in roles],
        "notes": notes,
        "rss_start_mb": rss_start,
        **figures(intervals, warmup, args.max_rss_growth),
    }
    print("\n" + tables(document, max_rows=MAX_ROWS_PRINTED))
    report.write(args.out, document, markdown=tables(document, max_rows=None))
    if not document["verdict"]["ok"]:
        say(f"mha bench soak: FAIL: {'; '.join(document['verdict']['reasons'])}")
        return 1
    return 0


def figures(intervals: list[Interval], warmup: float, max_growth: float) -> dict[str, Any]:
    """The measured part of bench.json: intervals, per-kind figures, drift, verdict."""
    records = [interval_record(i, warmup) for i in intervals]
    return {
        "intervals": records,
        "kinds": kinds_record(intervals, warmup),
        "failure_details": failure_details(intervals),
        "p99_drift": p99_drift(records),
        "verdict": verdict(records, max_growth),
    }


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
        rss_table(document["intervals"], max_rows),
        "## per workload, after the warm-up",
        kinds_table(document["kinds"]),
        "## summary",
        summary_table(document),
    ]
    details = document["failure_details"]
    if details:
        rows = "\n".join(f"{n:>6}  {text}" for text, n in list(details.items())[:10])
        sections += ["## failures", rows]
    return "\n\n".join(sections)


def interval_record(interval: Interval, warmup_s: float) -> Row:
    return {
        "start_s": interval.start_s,
        "end_s": interval.end_s,
        "warmup": interval.start_s < warmup_s,  # begun during the warm-up
        "rss_mb": interval.rss_mb,
        "requests": len(interval.latencies) + sum(interval.failures.values()),
        "p50_ms": percentile_ms(interval.latencies, 50),
        "p99_ms": percentile_ms(interval.latencies, 99),
        "failures": dict(interval.failures),
        "refused": interval.refused,
    }


def kinds_record(intervals: Sequence[Interval], warmup_s: float) -> dict[str, Row]:
    """Per workload kind, after the warm-up (the whole run if it ended first): answers OK,
    p50, p99."""
    seconds: dict[str, list[float]] = {}
    judged = [i for i in intervals if i.start_s >= warmup_s] or intervals
    for interval in judged:
        for kind, took in zip(interval.kinds, interval.latencies, strict=True):
            seconds.setdefault(kind, []).append(took)
    return {
        kind: {"ok": len(s), "p50_ms": percentile_ms(s, 50), "p99_ms": percentile_ms(s, 99)}
        for kind, s in sorted(seconds.items())
    }


def failure_details(intervals: Sequence[Interval]) -> dict[str, int]:
    seen: Counter = Counter()
    for interval in intervals:
        seen.update(interval.details)
    return dict(seen.most_common())


def rss_growth(records: Sequence[Row]) -> Row:
    """VmRSS's trend over the judged part of the run: every sample after the warm-up.

    VmRSS swings by a tenth between two samples of a busy server (buffers come and go), so
    two samples, or the medians of a few at each end, say little; the Theil-Sen slope of
    every sample against time barely moves for a swing and moves for a climb. growth is the
    slope times the judged span, over the fitted level at its start, with its 95% interval.
    """
    sampled = [r for r in records if r["rss_mb"] is not None]
    after = [r for r in sampled if not r["warmup"]]
    note = "after the warm-up"
    if len(after) < 3:
        after, note = sampled, "the run ended before three samples after the warm-up: every sample"
    t, mb = [r["end_s"] for r in after], [r["rss_mb"] for r in after]
    trend = theil_sen(t, mb)
    if trend is None:
        return {"baseline_mb": None, "last_mb": None, "growth": None, "note": "too few samples"}
    span, baseline = t[-1] - t[0], trend.level(t[0])
    return {
        "baseline_mb": baseline,
        "last_mb": trend.level(t[-1]),
        "growth": trend.slope * span / baseline,
        "growth_low": trend.low * span / baseline,
        "growth_high": trend.high * span / baseline,
        "slope_mb_per_min": trend.slope * 60,
        "slope_interval_mb_per_min": [trend.low * 60, trend.high * 60],
        "span_s": span,
        "samples": len(after),
        "note": f"{note}; Theil-Sen trend of {len(after)} samples over {span:.0f} s, 95% interval",
    }


def p99_drift(records: Sequence[Row]) -> Row:
    """p99 of the last interval with answers against the first one after the warm-up."""
    measured = [r for r in records if r["p99_ms"] is not None]
    after = [r for r in measured if not r["warmup"]] or measured
    if not after:
        return {"first_ms": None, "last_ms": None, "ratio": None}
    first, last = after[0]["p99_ms"], after[-1]["p99_ms"]
    return {"first_ms": first, "last_ms": last, "ratio": last / first if first else None}


def verdict(records: Sequence[Row], max_growth: float) -> Row:
    """ok, and why not: any failed request, or VmRSS growth over max_growth whose interval
    excludes no growth (a climb, not a swing)."""
    failures = sum(sum(r["failures"].values()) for r in records)
    growth = rss_growth(records)
    reasons = []
    if failures:
        reasons.append(f"{failures} requests failed")
    if growth["growth"] is not None and growth["growth"] > max_growth and growth["growth_low"] > 0:
        reasons.append(
            f"VmRSS grew {growth['growth']:.1%} after the warm-up (95% interval "
            f"{growth['growth_low']:.1%} to {growth['growth_high']:.1%}; bound {max_growth:.0%})"
        )
    return {
        "ok": not reasons,
        "reasons": reasons,
        "failures": failures,
        "refused": sum(r["refused"] for r in records),
        "rss": growth,
        "max_growth": max_growth,
    }


def rss_table(records: Sequence[Row], max_rows: int | None = None) -> str:
    """VmRSS and latency per interval; at most max_rows, evenly spaced, the ends kept."""
    shown = list(range(len(records)))
    if max_rows is not None and len(records) > max_rows:
        shown = sorted({round(i * (len(records) - 1) / (max_rows - 1)) for i in range(max_rows)})
    rows = []
    for i in shown:
        r = records[i]
        failed = ", ".join(f"{c} {n}" for c, n in r["failures"].items()) or "0"
        rows.append(
            [
                f"{r['start_s']:.0f}-{r['end_s']:.0f}",
                "yes" if r["warmup"] else "",
                r["rss_mb"],
                r["requests"],
                r["p50_ms"],
                r["p99_ms"],
                failed,
            ]
        )
    headers = ["seconds", "warm-up", "VmRSS MB", "requests", "p50 ms", "p99 ms", "failed"]
    return table(headers, rows)


def kinds_table(kinds: dict[str, Row]) -> str:
    rows = [[k, v["ok"], v["p50_ms"], v["p99_ms"]] for k, v in kinds.items()]
    return table(["workload", "answers OK", "p50 ms", "p99 ms"], rows)


def summary_table(document: Row) -> str:
    v, drift = document["verdict"], document["p99_drift"]
    growth = v["rss"]["growth"]
    rows = [
        ["VmRSS after warm-up MB", v["rss"]["baseline_mb"]],
        ["VmRSS at the end MB", v["rss"]["last_mb"]],
        ["VmRSS read as", v["rss"]["note"]],
        [
            "VmRSS growth (trend)",
            f"{growth:+.1%} ({v['rss']['growth_low']:+.1%} to {v['rss']['growth_high']:+.1%}; "
            f"bound {v['max_growth']:.0%})"
            if growth is not None
            else "-",
        ],
        ["VmRSS slope MB/min", v["rss"].get("slope_mb_per_min")],
        ["p99 first interval after warm-up ms", drift["first_ms"]],
        ["p99 last interval ms", drift["last_ms"]],
        ["p99 drift (last / first)", drift["ratio"]],
        ["requests failed", v["failures"]],
        ["refusals sent again", v["refused"]],
        ["verdict", "PASS" if v["ok"] else "FAIL: " + "; ".join(v["reasons"])],
    ]
    return table(["soak", "value"], rows)
