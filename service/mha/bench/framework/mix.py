"""A mixed workload: a steady closed loop of every kind of work, recorded per interval.

`concurrency` workers share one channel. Each draws a unit of work (seeded) among the
models found, runs it to its end, then draws the next:
  self, cross  one ModelInfer on a stateless model, (B, L) drawn from the shapes (a cross
               model gets key and value of S = L)
  decode       a sequence on a KV-cache model: a prompt of P tokens with sequence_start,
               then steps of one token, the last with sequence_end
  memory       a sequence on a cross-attention memory model: the memory (S tokens) with
               the first step and sequence_start, steps of one query token, sequence_end
Requests go as bytes, answers stay undecoded (mha.bench.framework.unary), so the client's
own work stays small; admission refusals are sent again and counted. Every answer is
recorded in the interval it came back in; every
`interval_s` a sampler reads the server's VmRSS and starts the next interval.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mha import contract
from mha.bench.framework.refusals import Refusals
from mha.bench.framework.unary import model_infer, send
from mha.client.core import SequenceStep, infer_request

KINDS = ("self", "cross", "decode", "memory")
PROMPT, STEPS, MEMORY = (8, 64), (4, 16), (16, 128)  # P, steps, S of a sequence: ranges


@dataclass(frozen=True)
class Role:
    """A model and how the soak drives it."""

    kind: str  # one of KINDS
    model: str
    width: int  # E
    kdim: int
    vdim: int
    datatype: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Role:
        sequence = config.get("sequence")
        if sequence is None:
            kind = "self" if config.get("self_attention", True) else "cross"
        else:
            kind = "memory" if sequence.get("kind") == contract.MEMORY_KIND else "decode"
        width = int(config["d_model"])
        return cls(
            kind,
            config["name"],
            width,
            int(config.get("kdim") or width),
            int(config.get("vdim") or width),
            config.get("dtype", "FP32"),
        )


def roles_in(repository: Path) -> list[Role]:
    """Every model of the repository (its latest version), as mha.json describes it."""
    latest: dict[str, tuple[int, Path]] = {}
    for path in repository.glob("*/*/mha.json"):
        if path.parent.name.isdigit():
            name, version = path.parent.parent.name, int(path.parent.name)
            if version > latest.get(name, (0, path))[0]:
                latest[name] = (version, path)
    roles = []
    for name, (_, path) in sorted(latest.items()):
        config = {"name": name, **json.loads(path.read_text())}
        config["name"] = name  # the folder name is what the server serves
        roles.append(Role.from_config(config))
    return roles


@dataclass
class Interval:
    """Answers that came back between two samples, and the sample that closed it."""

    start_s: float  # since the run began
    end_s: float = 0.0
    rss_mb: float | None = None
    latencies: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)  # code -> count
    details: Counter = field(default_factory=Counter)  # "CODE: details" -> count
    refused: int = 0  # admission refusals sent again


class Recorder:
    """The intervals of a run; the current one gets every answer."""

    def __init__(self, rss_mb: Callable[[], float | None]) -> None:
        self.rss_mb = rss_mb
        self.began = time.perf_counter()
        self.intervals = [Interval(0.0)]
        self.requests = 0
        self.refusals = Refusals()

    def now(self) -> float:
        return time.perf_counter() - self.began

    def answer(self, kind: str, seconds: float, code: str, details: str) -> None:
        current = self.intervals[-1]
        self.requests += 1
        if code == "OK":
            current.latencies.append(seconds)
            current.kinds.append(kind)
        else:
            current.failures[code] += 1
            current.details[f"{code}: {' '.join(details.split())[:200]}"] += 1

    def restart(self) -> None:
        self.began = time.perf_counter()
        self.intervals = [Interval(0.0)]
        self.refusals = Refusals()

    def sample(self) -> Interval:
        """Close the current interval with a VmRSS sample, open the next; the closed one."""
        current, now = self.intervals[-1], self.now()
        current.end_s, current.rss_mb = now, self.rss_mb()
        current.refused = self.refusals.count - sum(i.refused for i in self.intervals[:-1])
        self.intervals.append(Interval(now))
        return current


@dataclass(frozen=True)
class Plan:
    """What to run: the models, the stateless shapes, how hard and how long."""

    url: str
    roles: tuple[Role, ...]
    shapes: tuple[tuple[int, int], ...]  # (B, L) of stateless requests
    concurrency: int
    duration_s: float
    interval_s: float
    max_requests: int = 0  # 0 = no bound
    timeout_s: float = 30.0
    seed: int = 0


class MixedLoad:
    """Runs a Plan; Recorder.intervals hold the figures."""

    def __init__(
        self,
        plan: Plan,
        rss_mb: Callable[[], float | None],
        on_sample: Callable[[Interval], None] | None = None,
    ) -> None:
        self.plan = plan
        self.recorder = Recorder(rss_mb)
        self.on_sample = on_sample
        self.pools: dict[str, list[bytes]] = {}  # stateless model -> serialized requests
        self.sequences = 0

    def stateless_pool(self, role: Role) -> list[bytes]:
        if role.model not in self.pools:
            self.pools[role.model] = [
                infer_request(role.model, inputs(role, batch, length, seed)).SerializeToString()
                for seed, (batch, length) in enumerate(self.plan.shapes * 2)
            ]
        return self.pools[role.model]

    def more(self) -> bool:
        bound = self.plan.max_requests
        in_time = self.recorder.now() < self.plan.duration_s
        return in_time and (not bound or self.recorder.requests < bound)

    async def send(self, call: Callable[..., Any], kind: str, body: bytes) -> bool:
        answer = await send(call, body, kind, self.plan.timeout_s, self.recorder.refusals)
        self.recorder.answer(kind, answer.seconds, answer.code, answer.details)
        return answer.code == "OK"

    async def unit(self, call: Callable[..., Any], rng: random.Random) -> None:
        role = rng.choice(self.plan.roles)
        if role.kind in ("self", "cross"):
            await self.send(call, role.kind, rng.choice(self.stateless_pool(role)))
            return
        self.sequences += 1
        sequence_id = f"soak-{self.plan.seed}-{self.sequences}"
        for body in sequence_requests(role, sequence_id, rng):
            if not await self.send(call, role.kind, body):
                return  # the server evicts it when idle

    async def sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.plan.interval_s)
            except asyncio.TimeoutError:
                self.closed(self.recorder.sample())

    def closed(self, interval: Interval) -> None:
        if self.on_sample is not None:
            self.on_sample(interval)

    async def run(self) -> list[Interval]:
        async with model_infer(self.plan.url) as call:
            stop = asyncio.Event()
            self.recorder.restart()
            sampler = asyncio.create_task(self.sampler(stop))

            async def worker(index: int) -> None:
                rng = random.Random(self.plan.seed * 1_000_003 + index)
                while self.more():
                    await self.unit(call, rng)

            await asyncio.gather(*(worker(i) for i in range(self.plan.concurrency)))
            stop.set()
            await sampler
            self.recorder.sample()
        closed = self.recorder.intervals[:-1]  # the last one opened after the final sample
        if len(closed) > 1 and closed[-1].end_s - closed[-1].start_s < self.plan.interval_s / 2:
            closed[-2:] = [merged(*closed[-2:])]  # a stub of a few answers says little alone
        self.closed(closed[-1])
        return closed


def merged(first: Interval, second: Interval) -> Interval:
    """Two consecutive intervals as one, with the later VmRSS sample."""
    return Interval(
        first.start_s,
        second.end_s,
        second.rss_mb,
        first.latencies + second.latencies,
        first.kinds + second.kinds,
        first.failures + second.failures,
        first.details + second.details,
        first.refused + second.refused,
    )


def inputs(role: Role, batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of a stateless request: query [B, L, E] (+ key, value [B, L, k/vdim])."""
    rng = np.random.default_rng(seed)
    dtype = contract.DTYPES[role.datatype]
    found = {contract.QUERY: rng.standard_normal((batch, length, role.width)).astype(dtype)}
    if role.kind == "cross":
        found[contract.KEY] = rng.standard_normal((batch, length, role.kdim)).astype(dtype)
        found[contract.VALUE] = rng.standard_normal((batch, length, role.vdim)).astype(dtype)
    return found


def sequence_requests(role: Role, sequence_id: str, rng: random.Random) -> list[bytes]:
    """Every request of one sequence, serialized: the first starts it, the last ends it."""
    data = np.random.default_rng(rng.getrandbits(32))
    dtype = contract.DTYPES[role.datatype]
    steps = rng.randint(*STEPS)
    if role.kind == "decode":
        first: dict[str, np.ndarray] = {
            contract.QUERY: data.standard_normal((1, rng.randint(*PROMPT), role.width))
        }
    else:
        memory = rng.randint(*MEMORY)
        first = {
            contract.QUERY: data.standard_normal((1, 1, role.width)),
            contract.KEY: data.standard_normal((1, memory, role.kdim)),
            contract.VALUE: data.standard_normal((1, memory, role.vdim)),
        }
    bodies = []
    for step in range(steps + 1):
        arrays = first if step == 0 else {contract.QUERY: data.standard_normal((1, 1, role.width))}
        control = SequenceStep(sequence_id, start=step == 0, end=step == steps)
        typed = {name: a.astype(dtype) for name, a in arrays.items()}
        bodies.append(infer_request(role.model, typed, sequence=control).SerializeToString())
    return bodies


def run_mix(
    plan: Plan,
    rss_mb: Callable[[], float | None],
    on_sample: Callable[[Interval], None] | None = None,
) -> list[Interval]:
    """Run the plan; the closed intervals, in order (on_sample sees each as it closes)."""
    return asyncio.run(MixedLoad(plan, rss_mb, on_sample).run())
