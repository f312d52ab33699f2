"""A load generator for any Open Inference Protocol gRPC server, in processes of its own.

Requests are serialized once, before the run, and sent as bytes (a unary_unary call with
no serializer sends them as they are; responses stay undecoded), so the measured time is
the server's and the wire's, not the client's protobuf work. Closed loop: N clients, each
sends its next request when the previous answer arrives. Open loop: Poisson arrivals at a
target rate; latency counts from the scheduled arrival, so a slow server cannot hide its
backlog (no coordinated omission). Every run is bounded in time and in count.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized

import grpc
import grpc.aio
import numpy as np

from mha.client.core import channel_options

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_OPEN_LOOP_INFLIGHT = 4096  # beyond this an open-loop arrival is dropped as CLIENT_OVERLOAD


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


@dataclass
class LoadResult:
    latencies_s: np.ndarray  # successful measured requests
    errors: dict[str, int]  # status code name -> count (measured window)
    elapsed_s: float  # measured window as it ran (until the last counted answer)
    sent: int = 0
    client_cpu_ms: float = float("nan")  # load generator's CPU per answer (it shares the cores)

    @property
    def completed(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.completed:
            return float("nan")
        return float(np.percentile(self.latencies_s, q) * 1e3)


@dataclass
class _Recorder:
    measure_from: float
    stop_at: float
    budget: int
    progress: Synchronized | None
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    sent: int = 0
    last_end: float = 0.0
    answers: int = 0  # warm-up included

    def more(self, now: float) -> bool:
        return now < self.stop_at and (not self.budget or self.sent < self.budget)

    def done(self, started: float, code: str | None) -> None:
        end = time.perf_counter()
        self.answers += 1
        if started < self.measure_from:
            return
        self.last_end = max(self.last_end, end)
        if code is None:
            self.latencies.append(end - started)
        else:
            self.errors[code] += 1
        if self.progress is not None:
            with self.progress.get_lock():
                self.progress.value += 1


async def _send(call: Callable, request: bytes, started: float, rec: _Recorder, timeout: float):
    try:
        await call(request, timeout=timeout)
        rec.done(started, None)
    except grpc.aio.AioRpcError as err:
        rec.done(started, err.code().name)


async def _closed(call: Callable, spec: LoadSpec, clients: int, rec: _Recorder, rng) -> None:
    async def client() -> None:
        while rec.more(time.perf_counter()):
            if time.perf_counter() >= rec.measure_from:
                rec.sent += 1
            await _send(call, rng.choice(spec.requests), time.perf_counter(), rec, spec.timeout_s)

    await asyncio.gather(*(client() for _ in range(clients)))


async def _open(call: Callable, spec: LoadSpec, rate: float, rec: _Recorder, rng) -> None:
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
            rec.done(arrival, "CLIENT_OVERLOAD")
            continue
        task = asyncio.create_task(
            _send(call, rng.choice(spec.requests), arrival, rec, spec.timeout_s)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _run(spec: LoadSpec, share: int, part: int, progress: Synchronized | None) -> dict:
    rng = random.Random(spec.seed * 1000 + part)
    async with grpc.aio.insecure_channel(spec.url, options=channel_options(1 << 30)) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=spec.timeout_s)
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        start, cpu_start = time.perf_counter(), time.process_time()
        budget = -(-spec.max_requests // spec.processes) if spec.max_requests else 0
        rec = _Recorder(
            start + spec.warmup_s, start + spec.warmup_s + spec.duration_s, budget, progress
        )
        if spec.rate > 0:
            await _open(call, spec, spec.rate / spec.processes, rec, rng)
        else:
            await _closed(call, spec, share, rec, rng)
    elapsed = max(rec.last_end - rec.measure_from, 0.0)
    return {
        "cpu": time.process_time() - cpu_start,
        "answers": rec.answers,
        "latencies": rec.latencies,
        "errors": dict(rec.errors),
        "elapsed": elapsed,
        "sent": rec.sent,
    }


def _worker(spec: LoadSpec, share: int, part: int, progress, results) -> None:
    try:
        results.put((part, asyncio.run(_run(spec, share, part, progress))))
    except Exception as err:  # reported to the parent, which raises it
        results.put((part, {"failure": f"{type(err).__name__}: {err}"}))


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(
    spec: LoadSpec, on_progress: Callable[[int], None] | None = None, poll_s: float = 0.2
) -> LoadResult:
    """Run `spec` in spec.processes child processes; return the merged measurements."""
    ctx = multiprocessing.get_context("spawn")  # grpc's core must not be forked
    progress = ctx.Value("l", 0)
    results = ctx.Queue()
    processes = max(1, min(spec.processes, spec.concurrency if spec.rate <= 0 else spec.processes))
    spec = LoadSpec(**{**spec.__dict__, "processes": processes})
    shares = _shares(spec.concurrency, processes)
    workers = [
        ctx.Process(target=_worker, args=(spec, shares[i], i, progress, results), daemon=True)
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    parts: dict[int, dict] = {}
    deadline = time.monotonic() + spec.warmup_s + spec.duration_s + spec.timeout_s + 30
    while len(parts) < processes and time.monotonic() < deadline:
        try:
            part, data = results.get(timeout=poll_s)
            parts[part] = data
        except Exception:  # queue.Empty: nothing yet
            pass
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
    elapsed = max(p["elapsed"] for p in parts.values())
    sent = sum(p["sent"] for p in parts.values())
    answers = sum(p["answers"] for p in parts.values())
    cpu_ms = 1e3 * sum(p["cpu"] for p in parts.values()) / answers if answers else float("nan")
    return LoadResult(latencies, dict(errors), elapsed, sent, cpu_ms)
