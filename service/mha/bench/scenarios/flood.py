"""`mha bench flood`: the server under bursts and garbage, measured from outside.

Phases (--phases), each followed by one good request on a fresh channel:
  a       burst A: 600 ModelInfer requests, query (8,128), fired at once on ONE channel
  b       burst B: 2,000 requests of (1,16) the same way
  random  3,000 requests, at most 16 in flight: mostly valid with random shapes, some
          hostile (sizes up to and past the limits, raw bytes off by one, malformed
          fields), some not protobuf at all (mha.bench.scenarios.garbage), after a warm-up of
          the same mix; the server's VmRSS after the warm-up, after the run and after a
          quiet period
By default it starts `mha serve` (batching on, the default model, exported if missing;
flags via --server-arg); --url measures a running server. Targets print PASS or MISS;
the exit status is 0 either way (figures, not a test) unless the server could not be
started, died, or could not be reached. The machine may be shared: the JSON and the
tables carry the load average before and after. Refusals are what a flood measures: unlike
every other scenario, it keeps them as answers and does not send them again.

Each burst also gets the server's side (mha.bench.framework.probes): /metrics scraped before
and after it, the delta of the request, queue and session-run histograms (quantiles as
bucket bounds), the bytes the burst sent, its rate over the wall time, and client p99
minus server p99 as an estimate of what the wire and the client's event loop took.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from mha import contract
from mha.bench.framework import options, probes, report
from mha.bench.framework.contenders import Contenders, Server, ServerFailed, given_or_started
from mha.bench.framework.models import DEFAULT_MODEL, default_model
from mha.bench.framework.report import say
from mha.bench.framework.unary import Answer, Fired, NoConnection, burst, each, probe
from mha.bench.scenarios import bursts, garbage
from mha.client import Client, ClientError
from mha.errors import CliError

PHASES = ("a", "b", "random")
EXPORT_LIMITS = (64, 4096)  # `mha export`'s default max_batch_size, max_sequence_length
QUEUE_DELAY_FLAG, QUEUE_DELAY_ENV = "--max-queue-delay-ms", "MHA_MAX_QUEUE_DELAY_MS"


FLAGS: tuple[options.Flag, ...] = (
    ("--model", dict(default=DEFAULT_MODEL, help="a self-attention model (default mha)")),
    ("--phases", dict(default=",".join(PHASES), help="subset of a,b,random")),
    ("--burst-a", dict(type=int, default=600, metavar="N", help="default 600")),
    ("--burst-a-shape", dict(type=options.shape, default=(8, 128), metavar="BxL")),
    ("--burst-b", dict(type=int, default=2000, metavar="N", help="default 2000")),
    ("--burst-b-shape", dict(type=options.shape, default=(1, 16), metavar="BxL")),
    ("--random", dict(type=int, default=3000, metavar="N", dest="random_requests",
                      help="random requests (default 3000)")),
    ("--random-warmup", dict(type=int, metavar="N",
                             help="warm-up requests of the same mix (default: a tenth, >= 20)")),
    ("--random-concurrency", dict(type=int, default=16, metavar="N")),
    ("--random-max-mib", dict(type=float, default=8.0, metavar="MIB",
                              help="raw bytes per random request at most (default 8)")),
    ("--quiet-seconds", dict(type=float, default=5.0, help="after the random run")),
    ("--max-rss-growth", dict(type=float, default=0.2,
                              help="the random run's memory target (default 0.2 = 20%%)")),
    ("--timeout", dict(type=float, default=30.0,
                       help="every request's deadline, s (0 = none; default 30)")),
    ("--seed", dict(type=int, default=0)),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_flags(parser.add_argument_group("what to send"), FLAGS)
    server = options.add_existing_server_arguments(parser)
    server.add_argument(QUEUE_DELAY_FLAG, type=float, dest="max_queue_delay_ms",
                        help="passed to mha serve; also the bound of the latency target "
                        "(default: the server's default, or what --server-arg gives)")  # fmt: skip
    options.add_output_arguments(parser, Path("bench-out/flood"), plot=False)


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


def model_shapes(target: Server, args: argparse.Namespace, repository: Path) -> garbage.Shapes:
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
    return garbage.Shapes(
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
    return {"code": answer.code, "details": bursts.trimmed(answer.details), "ms": ms}


class Flood:
    """Runs the phases against one target and keeps their records."""

    def __init__(self, args: argparse.Namespace, target: Server, shapes: garbage.Shapes) -> None:
        self.args, self.target, self.shapes = args, target, shapes
        self.timeout = args.timeout or None
        self.good = garbage.query_request(shapes, 1, min(16, shapes.max_length), seed=args.seed)
        self.records: list[dict[str, Any]] = []

    def probe(self) -> dict[str, Any]:
        self.target.check_alive()
        return probe_record(probe(self.target.url, self.good))

    def burst(self, name: str, count: int, batch_length: tuple[int, int]) -> None:
        batch, length = batch_length
        say(f"{name}: {count} x ({batch},{length}) at once on one channel ...")
        body = garbage.query_request(self.shapes, batch, length, seed=self.args.seed)
        model = self.shapes.model
        rss_before, before = self.target.rss_mb(), self.target.metrics()
        fired = burst(self.target.url, body, count, self.timeout)
        rss_after, after = self.target.rss_mb(), self.target.metrics()
        record = self.record(name, fired)
        refused_early = sum(record["summary"]["before_handler"].values())
        record.update(
            shape=f"({batch},{length})",
            server=run_figures(before, after, model),
            server_view=probes.server_view(before, after, model),
            sent=sent(len(body), count - refused_early, fired.wall_s),
            rss_mb={"before": rss_before, "after": rss_after},
            probe=self.probe(),
        )
        record["breakdown"] = bursts.breakdown(record)
        self.keep(record)
        say(bursts.server_sentence(record))

    def random(self) -> None:
        args, count = self.args, self.args.random_requests
        warmup = args.random_warmup if args.random_warmup is not None else max(20, count // 10)
        requests = garbage.RandomRequests(self.shapes, args.seed)
        timeout = self.timeout or 60.0
        say(f"random: {warmup} warm-up requests, then {count}, {args.random_concurrency} at once")
        warm = each(
            self.target.url,
            requests.make,
            range(count, count + warmup),
            args.random_concurrency,
            timeout,
        )
        rss_warm = self.target.rss_mb()
        fired = each(self.target.url, requests.make, range(count), args.random_concurrency, timeout)
        rss_after = self.target.rss_mb()
        time.sleep(args.quiet_seconds)
        record = self.record("random", fired)
        record.update(
            concurrency=args.random_concurrency,
            warmup=warmup,
            warmup_codes=bursts.summarize(warm.answers)["codes"],
            kinds=bursts.by_kind(fired.answers),
            quiet_s=args.quiet_seconds,
            rss_mb={"warm": rss_warm, "after": rss_after, "quiet": self.target.rss_mb()},
            probe=self.probe(),
        )
        self.keep(record)

    def record(self, name: str, fired: Fired) -> dict[str, Any]:
        self.target.check_alive()
        summary = bursts.summarize(fired.answers)
        return {"name": name, "wall_s": fired.wall_s, "timeout_s": self.timeout, "summary": summary}

    def keep(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        codes = ", ".join(f"{c} {n}" for c, n in record["summary"]["codes"].items())
        say(
            f"{record['name']}: {codes} in {record['wall_s']:.1f} s; "
            f"good request after: {record['probe']['code']}"
        )


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


def run_figures(before: str | None, after: str | None, model: str) -> dict[str, Any]:
    """Session runs during a phase, from /metrics: how many, mean ms, mean samples."""
    change = probes.deltas(probes.totals(before, model), probes.totals(after, model))
    return {key: change[key] for key in ("runs", "run_ms", "mean_batch")}


def run(args: argparse.Namespace) -> int:
    phases = phases_from(args)
    repository = args.repository or args.out / "models"
    if not args.url and args.model == DEFAULT_MODEL:
        default_model(repository)
    args.out.mkdir(parents=True, exist_ok=True)
    delay_ms, delay_source = max_queue_delay_ms(args)
    started, load_before = time.time(), os.getloadavg()
    extra = (
        []
        if args.max_queue_delay_ms is None
        else [QUEUE_DELAY_FLAG, f"{args.max_queue_delay_ms:g}"]
    )
    try:
        with Contenders(args.out / "logs", args.threads, args.server_arg) as contenders:
            target = given_or_started(args, contenders, repository, extra)
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
            server = target.record()
    except (NoConnection, ServerFailed) as err:
        raise CliError(str(err)) from None
    document: dict[str, Any] = {
        **report.run_record(started, load_before),
        "server": server,
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
    report.write(args.out, document, markdown=print_tables(document))
    return 0


def targets(document: dict[str, Any], max_growth: float) -> list[dict[str, Any]]:
    delay = document["max_queue_delay_ms"]["value"]
    found = []
    for record in document["phases"]:
        if record["name"] == "random":
            found += bursts.random_targets(record, max_growth)
        else:
            found += bursts.burst_targets(record, delay)
    return found


def print_tables(document: dict[str, Any]) -> str:
    """Print every table and the PASS/MISS lines; return the same as Markdown."""
    records, delay = document["phases"], document["max_queue_delay_ms"]
    burst_records = [r for r in records if r["name"] != "random"]
    randoms = [r for r in records if r["name"] == "random"]
    heading = report.load_heading("mha bench flood", document["machine"]).strip()
    sections = [
        f"# {heading}",
        f"max queue delay {delay['value']:g} ms ({delay['from']}); "
        f"server {document['server']['url']}",
    ]
    if burst_records:
        sections += [
            "## bursts, every request started at once on one channel",
            bursts.bursts_table(burst_records),
            "## bursts, server side: handler start -> answer (delta of /metrics over the burst)",
            bursts.server_table(burst_records),
            bursts.bounds_line(burst_records),
            "## bursts, transfer and the wire's share (client p99 - server p99, an estimate)",
            bursts.transfer_table(burst_records),
            "\n".join(bursts.server_sentence(b) for b in burst_records),
        ]
    sections += ["## refusals by code and details", bursts.details_table(records)]
    for r in randoms:
        s = r["summary"]
        sections += [
            f"## random requests ({s['requests']} after {r['warmup']} warm-up, "
            f"{r['concurrency']} in flight, {r['wall_s']:.1f} s)",
            bursts.kinds_table(r["kinds"]),
            bursts.memory_table(r),
            f"good request after: {r['probe']['code']}",
        ]
    sections += [
        "## targets",
        report.targets_table(document["targets"], phase=True),
        report.target_lines(document["targets"]),
    ]
    text = "\n\n".join(sections)
    print("\n" + text)
    return text


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
