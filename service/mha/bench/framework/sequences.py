"""Sequence workloads: sequences stepping over ModelStreamInfer streams, timed step by step.

One AsyncClient (one channel) and one stream per sequence; each sequence is a closed loop
(its next step goes out when the previous answer came back), so with N sequences up to N
steps wait in the server at once and batching can merge them. Phases: every sequence's
prefill request, if it has one (a decode prompt), then every sequence's steps (the timed
phase), then /metrics is read while the sequences are still live, then the streams close,
which ends their sequences on the server. Admission refusals are sent again and counted
(mha.bench.framework.refusals); any other error ends the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mha import contract
from mha.bench.framework import models, options, probes, report
from mha.bench.framework.contenders import Contenders, ServerFailed
from mha.bench.framework.refusals import Refusals
from mha.client import AsyncClient, AsyncStream, ClientError, SequenceStep
from mha.errors import CliError

DTYPE = np.dtype(np.float32)  # the benchmarks' models are fp32
Inputs = dict[str, np.ndarray]
Request = tuple[Inputs, SequenceStep | None]  # what one step sends


@dataclass(frozen=True)
class SequencePlan:
    """One sequence's requests: an optional prefill (not a step), then the timed steps."""

    prefill: Request | None
    steps: Sequence[Request]


@dataclass
class Measured:
    """What one contender's run of one workload took."""

    step_s: list[float]  # every timed step of every sequence
    seconds: float  # wall time of the steps' phase
    first_s: list[float]  # each sequence's prefill, or its first step when it has none
    first_row: np.ndarray  # sequence 0's last output row [E]
    server: dict[str, Any] = field(default_factory=dict)  # figures read from /metrics
    refused: int = 0  # admission refusals sent again

    @property
    def tokens(self) -> int:
        return len(self.step_s)

    @classmethod
    def pooled(cls, runs: Sequence[Measured]) -> Measured:
        """Repeats of one workload as one measurement: steps pooled, step time summed,
        server figures averaged (the cache bytes: the largest seen)."""
        server: dict[str, Any] = {}
        for key in runs[0].server:
            seen = [r.server[key] for r in runs if r.server.get(key) is not None]
            pick = max if key == "cache_bytes" else lambda v: float(np.mean(v))
            server[key] = pick(seen) if seen else None
        return cls(
            [t for r in runs for t in r.step_s],
            sum(r.seconds for r in runs),
            [t for r in runs for t in r.first_s],
            runs[0].first_row,
            server,
            sum(r.refused for r in runs),
        )

    def record(self) -> dict[str, Any]:
        """The step figures of a point of bench.json."""
        ms = np.array(self.step_s) * 1e3
        p50, p90, p99, top = (float(np.percentile(ms, q)) for q in (50, 90, 99, 100))
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "p50_ms": p50,
            "p90_ms": p90,
            "p99_ms": p99,
            "max_ms": top,
            "mean_batch": self.server.get("mean_batch"),
            "padding_fraction": self.server.get("padding_fraction"),
            "cache_bytes": self.server.get("cache_bytes"),
            "refused": self.refused,
        }


@dataclass(frozen=True)
class Served:
    """A served contender of a sequence scenario: the server, the model, its /metrics."""

    url: str
    model: str
    holds_state: bool  # the server keeps a cache or memory: its bytes are read
    metrics: Callable[[], str | None]


async def exchange(
    stream: AsyncStream, model: str, request: Request, refusals: Refusals
) -> tuple[np.ndarray, float]:
    """Send one request and wait for its answer: (the last output row [E], seconds)."""
    inputs, control = request
    began = time.perf_counter()

    async def attempt() -> Any:
        await stream.send(model, inputs, sequence=control)
        return await stream.receive()

    def code(answer: Any) -> str:
        return "OK" if answer.error is None else answer.error.code.name

    answer = await refusals.retried(attempt, code)
    seconds = time.perf_counter() - began
    if answer.error is not None:
        raise answer.error
    return answer.result.outputs[contract.OUTPUT][0, -1], seconds


async def _finish(stream: AsyncStream) -> None:
    """End the request side and wait until the server ends the stream (and its sequences)."""
    await stream.close()
    with contextlib.suppress(ClientError):
        await stream.receive()


@contextlib.asynccontextmanager
async def open_streams(client: AsyncClient, count: int) -> AsyncIterator[list[AsyncStream]]:
    streams = [client.stream() for _ in range(count)]
    try:
        yield streams
    finally:  # after a failure some are broken already: their errors say nothing new
        await asyncio.gather(*(_finish(s) for s in streams), return_exceptions=True)


async def _steps(
    stream: AsyncStream, model: str, plan: SequencePlan, refusals: Refusals
) -> tuple[list[float], np.ndarray]:
    seconds, row = [], np.zeros(0, DTYPE)
    for request in plan.steps:
        row, took = await exchange(stream, model, request, refusals)
        seconds.append(took)
    return seconds, row


async def _run(how: Served, plans: list[SequencePlan]) -> Measured:
    refusals = Refusals()
    async with (
        AsyncClient(how.url, timeout=None) as client,
        open_streams(client, len(plans)) as streams,
    ):
        prefills = [
            exchange(s, how.model, p.prefill, refusals)
            for s, p in zip(streams, plans, strict=True)
            if p.prefill
        ]
        first = [took for _, took in await asyncio.gather(*prefills)]
        before = probes.totals(how.metrics(), how.model)
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(_steps(s, how.model, p, refusals) for s, p in zip(streams, plans, strict=True))
        )
        seconds = time.perf_counter() - started
        after = probes.totals(how.metrics(), how.model)  # the sequences are live: they count
    server = {
        **probes.deltas(before, after),
        "cache_bytes": after.get("cache_bytes") if how.holds_state else None,
    }
    steps = [t for step_s, _ in runs for t in step_s]
    first = first or [step_s[0] for step_s, _ in runs]
    return Measured(steps, seconds, first, runs[0][1], server, refusals.count)


def run_sequences(how: Served, plans: list[SequencePlan]) -> Measured:
    """Every sequence of `plans` at once against a server (see the module docstring)."""
    return asyncio.run(_run(how, plans))


def agreement(
    rows: dict[tuple[Any, ...], np.ndarray],
    where: Sequence[str],
    reference: str = "cached",
    skip: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Max |diff| of sequence 0's last output row between the reference contender and each
    other one (those in `skip` aside), per workload; rows: (contender, *where) -> row."""
    found = []
    for (name, *at), row in rows.items():
        theirs = rows.get((reference, *at))
        if name != reference and name not in skip and theirs is not None:
            diff = float(np.abs(row.astype(np.float64) - theirs).max())
            found.append(
                {
                    **dict(zip(where, at, strict=True)),
                    "pair": f"{reference} vs {name}",
                    "max_abs_diff": diff,
                }
            )
    return found


def run_pair_scenario(
    args: argparse.Namespace, kind: models.PairKind, preset: Any,
    measure: Callable[[Any, models.Pair, Contenders], dict[str, Any]],
) -> tuple[dict[str, Any], Any, models.Pair]:  # fmt: skip
    """A scenario over a pair of models: its sizes (the preset with the flags laid over), the
    pair (exported when missing), its contenders started and stopped around measure(sizes,
    pair, contenders); the document so far, the sizes and the pair."""
    sizes = options.laid_over(preset, args, ("steps", "d_model", "num_heads", "repeats"))
    pair = models.ensure_pair(kind, args.repository or args.out / "models", sizes.d_model,
                              sizes.num_heads)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    try:
        with Contenders(args.out / "logs", args.threads, args.server_arg) as contenders:
            figures = measure(sizes, pair, contenders)
    except (ServerFailed, ClientError) as err:  # a server that died, a step that failed
        raise CliError(" ".join(str(err).split())) from None
    head = {"preset": "quick" if args.quick else "full", "sizes": options.sizes_record(sizes)}
    return {**head, **report.run_record(started, load_before), **figures}, sizes, pair
