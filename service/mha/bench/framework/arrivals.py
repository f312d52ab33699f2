"""A mixed sequence workload: sequences decoding while new long prompts arrive.

The decoding sequences send their prompts, then step one token at a time (closed loops, as
in mha.bench.framework.sequences); once every one of them has stepped `settle` times, the
arriving sequences send their prompts one after the other on streams of their own. Every
step is timed with its start and end, so it is told apart by whether a prompt was in flight
at any moment of it ("during") or not ("without"): the figure is how much a prefill holds
up the steps of the others (chunked prefill keeps it to a chunk's run).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from mha.bench.framework.refusals import Refusals
from mha.bench.framework.sequences import (
    Request,
    SequencePlan,
    Served,
    exchange,
    open_streams,
)
from mha.client import AsyncClient, AsyncStream


@dataclass
class Mixed:
    """Steps of the decoding sequences, with or without a prompt in flight; the prompts."""

    during_s: list[float]
    without_s: list[float]
    prefill_s: list[float]
    refused: int = 0

    @staticmethod
    def pooled(runs: list[Mixed]) -> Mixed:
        return Mixed(
            [t for r in runs for t in r.during_s],
            [t for r in runs for t in r.without_s],
            [t for r in runs for t in r.prefill_s],
            sum(r.refused for r in runs),
        )

    def record(self) -> dict[str, float | int | None]:
        def ms(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) * 1e3 if values else None

        return {
            "steps_during": len(self.during_s),
            "steps_without": len(self.without_s),
            "during_p50_ms": ms(self.during_s, 50),
            "during_p99_ms": ms(self.during_s, 99),
            "without_p50_ms": ms(self.without_s, 50),
            "without_p99_ms": ms(self.without_s, 99),
            "prefill_p50_ms": ms(self.prefill_s, 50),
            "refused": self.refused,
        }


async def _mixed(
    how: Served, decoding: list[SequencePlan], arriving: list[Request], settle: int
) -> Mixed:
    refusals = Refusals()
    spans: list[tuple[float, float]] = []  # the steps' (start, end)
    prompts: list[tuple[float, float]] = []
    settled = asyncio.Barrier(len(decoding) + 1)

    async def steps(stream: AsyncStream, plan: SequencePlan) -> None:
        for k, request in enumerate(plan.steps):
            if k == settle:
                await settled.wait()
            began = time.perf_counter()
            await exchange(stream, how.model, request, refusals)
            spans.append((began, time.perf_counter()))

    async def arrive(streams: list[AsyncStream]) -> None:
        await settled.wait()
        for stream, request in zip(streams, arriving, strict=True):
            began = time.perf_counter()
            await exchange(stream, how.model, request, refusals)
            prompts.append((began, time.perf_counter()))

    async with (
        AsyncClient(how.url, timeout=None) as client,
        open_streams(client, len(decoding) + len(arriving)) as streams,
    ):
        ours, theirs = streams[: len(decoding)], streams[len(decoding) :]
        await asyncio.gather(
            *(
                exchange(s, how.model, p.prefill, refusals)
                for s, p in zip(ours, decoding, strict=True)
                if p.prefill is not None
            )
        )
        await asyncio.gather(
            arrive(theirs), *(steps(s, p) for s, p in zip(ours, decoding, strict=True))
        )
    during: list[float] = []
    without: list[float] = []
    for began, ended in spans:
        overlaps = any(began < p_end and p_began < ended for p_began, p_end in prompts)
        (during if overlaps else without).append(ended - began)
    prefill = [end - began for began, end in prompts]
    return Mixed(during, without, prefill, refusals.count)


def run_mixed(
    how: Served, decoding: list[SequencePlan], arriving: list[Request], settle: int = 2
) -> Mixed:
    """The decoding sequences stepping, `arriving` prompts sent once they have settled."""
    return asyncio.run(_mixed(how, decoding, arriving, settle))
