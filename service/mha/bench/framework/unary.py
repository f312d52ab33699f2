"""Unary workloads: ModelInfer requests sent as bytes, from this process or from children.

Requests are serialized once, before the run, and sent as bytes (a unary_unary call with
no serializer sends them as they are; answers stay undecoded), so the measured time is the
server's and the wire's, not the client's protobuf work, and hostile bytes no encoder would
write can be sent as well. Each answer keeps its code, details and latency from the moment
its call started. With a Refusals counter, admission refusals are sent again
(mha.bench.framework.refusals) and the latency includes the waits.

run_load: closed loop (N clients, each sends its next request when the previous answer
arrives) or open loop (Poisson arrivals at a target rate; latency counts from the scheduled
arrival, so a slow server cannot hide its backlog: no coordinated omission), in processes of
their own, bounded in time and in count. burst: every call started at once on one channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import grpc
import grpc.aio
import numpy as np

from mha.bench.framework.refusals import Refusals
from mha.client.core import channel_options

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_OPEN_LOOP_INFLIGHT = 4096  # beyond this an open-loop arrival is dropped as CLIENT_OVERLOAD
CONNECT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 1 << 30  # the client's own limit: the server's is what is measured
Call = Callable[..., Any]


class NoConnection(RuntimeError):
    """The bench could not send at all: no figure would mean anything."""


@dataclass(frozen=True)
class Answer:
    kind: str  # what was sent: "burst", "probe", a random kind, a soak workload
    code: str  # "OK" or the grpc.StatusCode name
    details: str
    seconds: float


@contextlib.asynccontextmanager
async def model_infer(url: str, own_connection: bool = False) -> AsyncIterator[Call]:
    """ModelInfer on a fresh channel, bytes in and out; NoConnection if it cannot connect.
    own_connection: never shared with another channel to the url (gRPC shares by default)."""
    options = channel_options(MAX_MESSAGE_BYTES)
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    async with grpc.aio.insecure_channel(url, options=options) as ch:
        try:
            await asyncio.wait_for(ch.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NoConnection(f"{url}: no connection in {CONNECT_TIMEOUT_S:g} s") from None
        yield ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)


async def send(
    call: Call, body: bytes, kind: str, timeout: float | None, refusals: Refusals | None = None
) -> Answer:
    """One request; with `refusals`, admission refusals are sent again and counted."""
    began = time.perf_counter()

    async def attempt() -> tuple[str, str]:
        try:
            await call(body, timeout=timeout)
            return "OK", ""
        except grpc.aio.AioRpcError as err:
            return err.code().name, err.details() or ""

    if refusals is None:
        code, details = await attempt()
    else:
        code, details = await refusals.retried(attempt, lambda answer: answer[0])
    return Answer(kind, code, details, time.perf_counter() - began)


@dataclass(frozen=True)
class Fired:
    answers: list[Answer]
    wall_s: float  # first call started -> last answer


def burst(url: str, body: bytes, count: int, timeout: float | None) -> Fired:
    """`count` calls of one request on one channel, every one started before any answer."""

    async def run() -> Fired:
        async with model_infer(url) as call:
            began = time.perf_counter()
            answers = await asyncio.gather(
                *(send(call, body, "burst", timeout) for _ in range(count))
            )
            return Fired(list(answers), time.perf_counter() - began)

    return asyncio.run(run())


def each(
    url: str,
    make: Callable[[int], tuple[str, bytes]],
    indices: Iterable[int],
    concurrency: int,
    timeout: float,
) -> Fired:
    """make(index) -> (kind, body) for every index, at most `concurrency` in flight."""

    async def run() -> Fired:
        todo = iter(indices)  # shared by the workers: each index is sent once
        answers: list[Answer] = []

        async def worker(call: Call) -> None:
            for index in todo:
                kind, body = make(index)
                answers.append(await send(call, body, kind, timeout))

        async with model_infer(url) as call:
            began = time.perf_counter()
            await asyncio.gather(*(worker(call) for _ in range(concurrency)))
            return Fired(answers, time.perf_counter() - began)

    return asyncio.run(run())


def probe(url: str, body: bytes, timeout: float = 10.0) -> Answer:
    """One good request on a fresh channel: does the server still answer?"""

    async def run() -> Answer:
        async with model_infer(url) as call:
            return await send(call, body, "probe", timeout)

    try:
        return asyncio.run(run())
    except NoConnection as err:
        return Answer("probe", "NO_CONNECTION", str(err), float("nan"))


@dataclass(frozen=True)
class LoadSpec:
    """One measurement: where, what, how hard, how long."""

    url: str
    requests: Sequence[bytes]  # serialized ModelInferRequests; sent in a seeded random order
    concurrency: int = 1  # closed loop: clients; ignored when rate > 0
    rate: float = 0.0  # open loop: requests/s (Poisson); 0 = closed loop
    duration_s: float = 3.0  # measured window, after the warm-up
    warmup_s: float = 0.5  # sent but not counted
    max_requests: int = 0  # measured requests at most (0 = no limit)
    timeout_s: float = 30.0
    seed: int = 0
    processes: int = 1  # load-generator processes sharing the clients or the rate
    # closed loop: connections the clients spread over, in all (each process at least one);
    # a server with frontends (SO_REUSEPORT) spreads connections, not calls
    connections: int = 1


@dataclass
class LoadResult:
    latencies_s: np.ndarray  # successful measured requests
    errors: dict[str, int]  # status code name -> count (measured window)
    elapsed_s: float  # measured window as it ran (until the last counted answer)
    sent: int = 0
    client_cpu_ms: float = float("nan")  # load generator's CPU per answer (it shares the cores)
    refused: int = 0  # admission refusals sent again

    @property
    def completed(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.completed else float("nan")


@dataclass
class _Recorder:
    measure_from: float
    stop_at: float
    budget: int
    progress: Synchronized | None
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    refusals: Refusals = field(default_factory=Refusals)
    sent: int = 0
    last_end: float = 0.0
    answers: int = 0  # warm-up included

    def more(self, now: float) -> bool:
        return now < self.stop_at and (not self.budget or self.sent < self.budget)

    async def send(self, call: Call, body: bytes, started: float, timeout: float) -> None:
        answer = await send(call, body, "load", timeout, self.refusals)
        end = time.perf_counter()
        self.answers += 1
        if started < self.measure_from:
            return
        self.last_end = max(self.last_end, end)
        if answer.code == "OK":
            self.latencies.append(end - started)
        else:
            self.errors[answer.code] += 1
        if self.progress is not None:
            with self.progress.get_lock():
                self.progress.value += 1


async def _closed(calls: list[Call], spec: LoadSpec, clients: int, rec: _Recorder, rng) -> None:
    async def client(call: Call) -> None:
        while rec.more(time.perf_counter()):
            if time.perf_counter() >= rec.measure_from:
                rec.sent += 1
            await rec.send(call, rng.choice(spec.requests), time.perf_counter(), spec.timeout_s)

    await asyncio.gather(*(client(calls[i % len(calls)]) for i in range(clients)))


async def _open(call: Call, spec: LoadSpec, rate: float, rec: _Recorder, rng) -> None:
    tasks: set[asyncio.Task] = set()
    arrival = time.perf_counter()
    while True:
        arrival += rng.expovariate(rate)
        if not rec.more(arrival):
            break
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if arrival >= rec.measure_from:
            rec.sent += 1
        if len(tasks) >= MAX_OPEN_LOOP_INFLIGHT:
            if arrival >= rec.measure_from:
                rec.errors["CLIENT_OVERLOAD"] += 1
            continue
        body = rng.choice(spec.requests)
        task = asyncio.create_task(rec.send(call, body, arrival, spec.timeout_s))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _run(spec: LoadSpec, share: int, part: int, progress: Synchronized | None) -> dict:
    rng = random.Random(spec.seed * 1000 + part)
    async with contextlib.AsyncExitStack() as stack:
        count = 1 if spec.rate > 0 else max(1, min(share, -(-spec.connections // spec.processes)))
        calls = [await stack.enter_async_context(model_infer(spec.url, count > 1))
                 for _ in range(count)]  # fmt: skip
        call = calls[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        budget = -(-spec.max_requests // spec.processes) if spec.max_requests else 0
        measure_from = start + spec.warmup_s
        rec = _Recorder(measure_from, measure_from + spec.duration_s, budget, progress)
        if spec.rate > 0:
            await _open(call, spec, spec.rate / spec.processes, rec, rng)
        else:
            await _closed(calls, spec, share, rec, rng)
    return {
        "cpu": time.process_time() - cpu_start,
        "answers": rec.answers,
        "latencies": rec.latencies,
        "errors": dict(rec.errors),
        "elapsed": max(rec.last_end - rec.measure_from, 0.0),
        "sent": rec.sent,
        "refused": rec.refusals.count,
    }


def _worker(spec: LoadSpec, share: int, part: int, progress, results) -> None:
    try:
        results.put((part, asyncio.run(_run(spec, share, part, progress))))
    except Exception as err:  # reported to the parent, which raises it
        results.put((part, {"failure": f"{type(err).__name__}: {err}"}))


def run_load(
    spec: LoadSpec, on_progress: Callable[[int], None] | None = None, poll_s: float = 0.2
) -> LoadResult:
    """Run `spec` in spec.processes child processes; return the merged measurements."""
    ctx = multiprocessing.get_context("spawn")  # grpc's core must not be forked
    progress, results = ctx.Value("l", 0), ctx.Queue()
    processes = max(1, min(spec.processes, spec.concurrency if spec.rate <= 0 else spec.processes))
    spec = replace(spec, processes=processes)
    shares = [
        spec.concurrency // processes + (i < spec.concurrency % processes) for i in range(processes)
    ]
    workers = [
        ctx.Process(target=_worker, args=(spec, shares[i], i, progress, results), daemon=True)
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    parts: dict[int, dict] = {}
    deadline = time.monotonic() + spec.warmup_s + spec.duration_s + spec.timeout_s + 30
    while len(parts) < processes and time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # queue.Empty: nothing yet
            part, data = results.get(timeout=poll_s)
            parts[part] = data
        if on_progress is not None:
            on_progress(int(progress.value))
        if len(parts) < processes and not any(w.is_alive() for w in workers):
            try:  # a worker may have put its answer just before exiting
                part, data = results.get(timeout=poll_s)
                parts[part] = data
            except Exception:
                break
    for w in workers:
        w.join(timeout=5)
        if w.is_alive():
            w.kill()
    return _merge(parts, processes)


def _merge(parts: dict[int, dict], expected: int) -> LoadResult:
    failures = [p["failure"] for p in parts.values() if "failure" in p]
    if failures or len(parts) < expected:
        raise RuntimeError(f"load generator failed: {'; '.join(failures) or 'no answer'}")
    errors: Counter = Counter()
    for p in parts.values():
        errors.update(p["errors"])
    latencies = np.array([x for p in parts.values() for x in p["latencies"]], dtype=np.float64)
    answers = sum(p["answers"] for p in parts.values())
    cpu_ms = 1e3 * sum(p["cpu"] for p in parts.values()) / answers if answers else float("nan")
    return LoadResult(
        latencies,
        dict(errors),
        max(p["elapsed"] for p in parts.values()),
        sum(p["sent"] for p in parts.values()),
        cpu_ms,
        sum(p["refused"] for p in parts.values()),
    )
