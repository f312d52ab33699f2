"""`mha bench flood`: the server under bursts and garbage, measured from outside.

Phases (--phases), each followed by one good request on a fresh channel:
  a       burst A: 600 ModelInfer requests, query (8,128), fired at once on ONE channel
  b       burst B: 2,000 requests of (1,16) the same way
  random  3,000 requests, at most 16 in flight: mostly valid with random shapes, some
          hostile (sizes up to and past the limits, raw bytes off by one, malformed
          fields), some not protobuf at all (mha.bench.flood_requests), after a warm-up of
          the same mix; the server's VmRSS after the warm-up, after the run and after a
          quiet period
By default it starts `mha serve` (batching on, the default model, exported if missing;
flags via --server-arg); --url measures a running server. Targets print PASS or MISS;
the exit status is 0 either way (figures, not a test) unless the server could not be
started, died, or could not be reached. The machine may be shared: the JSON and the
tables carry the load average before and after.

Each burst also gets the server's side (mha.bench.flood_metrics): /metrics scraped before
and after it, the delta of the request, queue and session-run histograms (quantiles as
bucket bounds), the bytes the burst sent, its rate over the wall time, and client p99
minus server p99 as an estimate of what the wire and the client's event loop took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mha import contract
from mha.bench import arguments, flood_metrics, flood_report, report
from mha.bench.flood_load import Answer, Fired, FloodFailed, burst, probe, query_request, random_run
from mha.bench.flood_requests import RandomRequests, Shapes
from mha.bench.flood_server import (
    DEFAULT_MODEL,
    Target,
    add_target_arguments,
    ensure_default_model,
    flag_value,
    max_queue_delay_ms,
    open_target,
    run_totals,
)
from mha.client import Client, ClientError
from mha.errors import CliError

PHASES = ("a", "b", "random")
EXPORT_LIMITS = (64, 4096)  # `mha export`'s default max_batch_size, max_sequence_length


def shape(text: str) -> tuple[int, int]:
    """argparse type: BxL, e.g. 8x128."""
    try:
        batch, length = (int(n) for n in text.lower().split("x"))
    except ValueError:
        batch = length = 0
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"want BxL with B, L >= 1, e.g. 8x128; got {text!r}")
    return batch, length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to send")
    what.add_argument("--model", default=DEFAULT_MODEL, help="a self-attention model (default mha)")
    what.add_argument("--phases", default=",".join(PHASES), help="subset of a,b,random")
    what.add_argument("--burst-a", type=int, default=600, metavar="N", help="default 600")
    what.add_argument("--burst-a-shape", type=shape, default=(8, 128), metavar="BxL")
    what.add_argument("--burst-b", type=int, default=2000, metavar="N", help="default 2000")
    what.add_argument("--burst-b-shape", type=shape, default=(1, 16), metavar="BxL")
    what.add_argument(
        "--random",
        type=int,
        default=3000,
        metavar="N",
        dest="random_requests",
        help="random requests (default 3000)",
    )
    what.add_argument(
        "--random-warmup",
        type=int,
        metavar="N",
        help="warm-up requests of the same mix (default: a tenth, >= 20)",
    )
    what.add_argument("--random-concurrency", type=int, default=16, metavar="N")
    what.add_argument(
        "--random-max-mib",
        type=float,
        default=8.0,
        metavar="MIB",
        help="raw bytes per random request at most (default 8)",
    )
    what.add_argument("--quiet-seconds", type=float, default=5.0, help="after the random run")
    what.add_argument(
        "--max-rss-growth",
        type=float,
        default=0.2,
        help="the random run's memory target (default 0.2 = 20%%)",
    )
    what.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="every request's deadline, s (0 = none; default 30)",
    )
    what.add_argument("--seed", type=int, default=0)
    add_target_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out/flood"),
        help="folder for bench.json and bench.md (default: %(default)s)",
    )


def phases_from(args: argparse.Namespace) -> tuple[str, ...]:
    wanted = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in wanted if p not in PHASES]
    if unknown or not wanted:
        raise CliError(f"unknown --phases {args.phases!r}; choose from {', '.join(PHASES)}")
    counts = (args.burst_a, args.burst_b, args.random_requests, args.random_concurrency)
    if min(counts) < 1 or args.random_max_mib <= 0 or args.quiet_seconds < 0:
        raise CliError(
            "burst sizes, --random and --random-concurrency must be >= 1, --random-max-mib > 0 "
            "and --quiet-seconds >= 0"
        )
    return wanted


def model_shapes(target: Target, args: argparse.Namespace, repository: Path) -> Shapes:
    """The model's width and datatype (ModelMetadata) and its limits (mha.json, flags)."""
    try:
        with Client(target.url, timeout=10) as client:
            metadata = client.model_metadata(args.model)
    except ClientError as err:
        raise CliError(f"{target.url}: model {args.model!r}: {err}") from None
    names = {t.name: t for t in metadata.inputs}
    query = names.get(contract.QUERY)
    if (
        query is None
        or set(names) - {contract.QUERY, contract.KEY_PADDING_MASK}
        or len(query.shape) != 3
        or query.shape[0] != -1
    ):
        raise CliError(
            f"model {args.model!r} is not a stateless self-attention model (query [B, L, E])"
        )
    batch, length = EXPORT_LIMITS
    if args.repository or not args.url:  # the server's own repository: its mha.json
        versions = list((repository / args.model).glob("*/mha.json"))
        versions.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
        if versions:
            config = json.loads(versions[-1].read_text())
            batch, length = config["max_batch_size"], config["max_sequence_length"]
    flags = [] if args.url else list(args.server_arg)
    batch = int(flag_value(flags, "--max-batch-size") or batch)
    length = int(flag_value(flags, "--max-sequence-length") or length)
    return Shapes(
        args.model,
        int(query.shape[2]),
        query.datatype,
        batch,
        length,
        int(args.random_max_mib * (1 << 20)),
        contract.KEY_PADDING_MASK in names,
    )


def probe_record(answer: Answer) -> dict[str, Any]:
    ms = answer.seconds * 1e3 if answer.seconds == answer.seconds else None
    return {"code": answer.code, "details": flood_report.trimmed(answer.details), "ms": ms}


class Flood:
    """Runs the phases against one target and keeps their records."""

    def __init__(self, args: argparse.Namespace, target: Target, shapes: Shapes) -> None:
        self.args, self.target, self.shapes = args, target, shapes
        self.timeout = args.timeout or None
        self.good = query_request(shapes, 1, min(16, shapes.max_length), seed=args.seed)
        self.records: list[dict[str, Any]] = []

    def probe(self) -> dict[str, Any]:
        self.target.check_alive()
        return probe_record(probe(self.target.url, self.good))

    def burst(self, name: str, count: int, batch_length: tuple[int, int]) -> None:
        batch, length = batch_length
        say(f"{name}: {count} x ({batch},{length}) at once on one channel ...")
        body = query_request(self.shapes, batch, length, seed=self.args.seed)
        model = self.shapes.model
        rss_before, before = self.target.rss_mb(), self.target.metrics()
        fired = burst(self.target.url, body, count, self.timeout)
        rss_after, after = self.target.rss_mb(), self.target.metrics()
        record = self.record(name, fired)
        refused_early = sum(record["summary"]["before_handler"].values())
        record.update(
            shape=f"({batch},{length})",
            server=run_figures(run_totals(before, model), run_totals(after, model)),
            server_view=flood_metrics.server_view(before, after, model),
            sent=sent(len(body), count - refused_early, fired.wall_s),
            rss_mb={"before": rss_before, "after": rss_after},
            probe=self.probe(),
        )
        record["breakdown"] = flood_report.breakdown(record)
        self.keep(record)
        say(flood_report.server_sentence(record))

    def random(self) -> None:
        args, count = self.args, self.args.random_requests
        warmup = args.random_warmup if args.random_warmup is not None else max(20, count // 10)
        requests = RandomRequests(self.shapes, args.seed)
        timeout = self.timeout or 60.0
        say(f"random: {warmup} warm-up requests, then {count}, {args.random_concurrency} at once")
        warm = random_run(
            self.target.url,
            requests,
            range(count, count + warmup),
            args.random_concurrency,
            timeout,
        )
        rss_warm = self.target.rss_mb()
        fired = random_run(
            self.target.url, requests, range(count), args.random_concurrency, timeout
        )
        rss_after = self.target.rss_mb()
        time.sleep(args.quiet_seconds)
        record = self.record("random", fired)
        record.update(
            concurrency=args.random_concurrency,
            warmup=warmup,
            warmup_codes=flood_report.summarize(warm.answers)["codes"],
            kinds=flood_report.by_kind(fired.answers),
            quiet_s=args.quiet_seconds,
            rss_mb={"warm": rss_warm, "after": rss_after, "quiet": self.target.rss_mb()},
            probe=self.probe(),
        )
        self.keep(record)

    def record(self, name: str, fired: Fired) -> dict[str, Any]:
        self.target.check_alive()
        summary = flood_report.summarize(fired.answers)
        return {"name": name, "wall_s": fired.wall_s, "timeout_s": self.timeout, "summary": summary}

    def keep(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        codes = ", ".join(f"{c} {n}" for c, n in record["summary"]["codes"].items())
        say(
            f"{record['name']}: {codes} in {record['wall_s']:.1f} s; "
            f"good request after: {record['probe']['code']}"
        )


def run_figures(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """Session runs during a phase, from /metrics: how many, mean ms, mean samples."""
    if before is None or after is None:
        return {"runs": None, "run_ms": None, "mean_batch": None}
    runs = after["runs"] - before["runs"]
    compute, samples = (
        after["compute_s"] - before["compute_s"],
        after["samples"] - before["samples"],
    )
    return {
        "runs": runs,
        "run_ms": 1e3 * compute / runs if runs else None,
        "mean_batch": samples / runs if runs else None,
    }


def sent(message_bytes: int, messages: int, wall_s: float) -> dict[str, Any]:
    """What a burst put on its connection: `messages` requests (those the transport refused
    before the handler left out: they may not have sent their body), each with gRPC's
    5-byte prefix; HTTP/2 framing aside. The rate is over the burst's wall time."""
    total = (message_bytes + 5) * messages
    return {
        "message_bytes": message_bytes + 5,
        "messages": messages,
        "bytes": total,
        "mb_per_s": total / wall_s / 1e6 if wall_s > 0 else None,
    }


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    phases = phases_from(args)
    repository = args.repository or args.out / "models"
    if not args.url and args.model == DEFAULT_MODEL:
        ensure_default_model(repository)
    args.out.mkdir(parents=True, exist_ok=True)
    delay_ms, delay_source = max_queue_delay_ms(args)
    started, load_before = time.time(), os.getloadavg()
    target = open_target(args, repository, [])
    try:
        shapes = model_shapes(target, args, repository)
        flood = Flood(args, target, shapes)
        first = flood.probe()
        if first["code"] != "OK":
            raise CliError(
                f"a good request failed before the flood: {first['code']} {first['details']}"
            )
        if "a" in phases:
            flood.burst("burst A", args.burst_a, args.burst_a_shape)
        if "b" in phases:
            flood.burst("burst B", args.burst_b, args.burst_b_shape)
        if "random" in phases:
            flood.random()
    except FloodFailed as err:
        raise CliError(str(err)) from None
    finally:
        target.stop()
    document: dict[str, Any] = {
        "started": started,
        "seconds": time.time() - started,
        "machine": arguments.machine(load_before),
        "server": target.record(),
        "model": {
            "name": shapes.model,
            "width": shapes.width,
            "datatype": shapes.datatype,
            "max_batch_size": shapes.max_batch,
            "max_sequence_length": shapes.max_length,
        },
        "max_queue_delay_ms": {"value": delay_ms, "from": delay_source},
        "phases": flood.records,
    }
    document["targets"] = targets(document, args.max_rss_growth)
    text = print_tables(document)
    report.write_json(args.out / "bench.json", document)
    (args.out / "bench.md").write_text(text + "\n")
    print(f"\nwrote {args.out / 'bench.json'} and bench.md")
    return 0


def targets(document: dict[str, Any], max_growth: float) -> list[dict[str, Any]]:
    delay = document["max_queue_delay_ms"]["value"]
    found = []
    for record in document["phases"]:
        if record["name"] == "random":
            found += flood_report.random_targets(record, max_growth)
        else:
            found += flood_report.burst_targets(record, delay)
    return found


def print_tables(document: dict[str, Any]) -> str:
    """Print every table and the PASS/MISS lines; return the same as Markdown."""
    records, delay = document["phases"], document["max_queue_delay_ms"]
    bursts = [r for r in records if r["name"] != "random"]
    randoms = [r for r in records if r["name"] == "random"]
    heading = report.load_heading("mha bench flood", document["machine"]).strip()
    sections = [
        f"# {heading}",
        f"max queue delay {delay['value']:g} ms ({delay['from']}); "
        f"server {document['server']['url']}",
    ]
    if bursts:
        sections += [
            "## bursts, every request started at once on one channel",
            flood_report.bursts_table(bursts),
            "## bursts, server side: handler start -> answer (delta of /metrics over the burst)",
            flood_report.server_table(bursts),
            flood_report.bounds_line(bursts),
            "## bursts, transfer and the wire's share (client p99 - server p99, an estimate)",
            flood_report.transfer_table(bursts),
            "\n".join(flood_report.server_sentence(b) for b in bursts),
        ]
    sections += ["## refusals by code and details", flood_report.details_table(records)]
    for r in randoms:
        s = r["summary"]
        sections += [
            f"## random requests ({s['requests']} after {r['warmup']} warm-up, "
            f"{r['concurrency']} in flight, {r['wall_s']:.1f} s)",
            flood_report.kinds_table(r["kinds"]),
            flood_report.memory_table(r),
            f"good request after: {r['probe']['code']}",
        ]
    sections += [
        "## targets",
        flood_report.targets_table(document["targets"]),
        flood_report.verdict_lines(document["targets"]),
    ]
    text = "\n\n".join(sections)
    print("\n" + text)
    return text
