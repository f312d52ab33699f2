"""The decoding load of `mha bench decode`: sequences step by step, served and in process.

Served: one AsyncClient (one channel) and one ModelStreamInfer stream per sequence; each
sequence is a closed loop (its next step goes out when the previous answer came back), so
with N sequences up to N steps wait in the server at once and continuous batching can
merge them. Phases: every sequence's prompt (prefill), then every sequence's steps (the
timed decode phase), then /metrics is read while the sequences are still live, then the
streams close, which ends their sequences on the server. A step's output comes one of two
ways:
  cached     the KV-cache step model: the prompt once, then one token per step; the server
             holds the keys and values (Triton's sequence parameters).
  recompute  the stateless causal model: step k sends the whole prefix [1, P + k, E] and
             keeps the last row, which is what serving without a cache costs.
A request the server refuses with UNAVAILABLE (admission: its queue would wait too long,
e.g. 32 prefills of 1,024 tokens at once) is sent again after a growing pause, as the
refusal asks, up to RETRIES times; its time counts the wait, and the run counts the
refusals (`refused`). Any other error ends the run.
In process: the step graph through session.run in this process with its own numpy cache,
one sequence: what a step costs without the wire, the server and its batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from mha import contract
from mha.bench.run import counter_deltas
from mha.bench.servers import histogram_totals
from mha.client import AsyncClient, AsyncStream, ClientError, SequenceStep
from mha.service.core import decoding

CACHE_BYTES = re.compile(r"^mha_sequence_cache_bytes (\S+)$", re.MULTILINE)
DTYPE = np.dtype(np.float32)  # the benchmark's models are fp32
RETRIES = 20  # UNAVAILABLE refusals of one request sent again
RETRY_PAUSE_S = 0.05  # times the attempt number


@dataclass(frozen=True)
class Workload:
    """`sequences` sequences at once, each a prompt of P tokens then `steps` steps of one."""

    prompt: int
    steps: int
    sequences: int

    @property
    def context(self) -> int:
        """Tokens a sequence holds after its last step."""
        return self.prompt + self.steps

    @property
    def label(self) -> str:
        return f"P={self.prompt} x{self.sequences}"


def sequence_tokens(workload: Workload, width: int, seed: int) -> list[np.ndarray]:
    """Each sequence's tokens [1, P + steps, E], seeded by (seed, P, index): sequence i of a
    prompt length is the same for every contestant, so their answers can be compared."""
    shape = (1, workload.context, width)
    return [
        np.random.default_rng((seed, workload.prompt, i)).standard_normal(shape).astype(DTYPE)
        for i in range(workload.sequences)
    ]


@dataclass
class Measured:
    """What one contestant's run of one workload took."""

    step_s: list[float]  # every timed step of every sequence
    seconds: float  # wall time of the decode phase
    prefill_s: list[float]  # each sequence's prompt request (none for recompute)
    first_row: np.ndarray  # sequence 0's last output row [E]
    server: dict[str, Any] = field(default_factory=dict)  # figures read from /metrics
    refused: int = 0  # UNAVAILABLE refusals sent again

    @property
    def tokens(self) -> int:
        return len(self.step_s)

    @classmethod
    def pooled(cls, runs: list[Measured]) -> Measured:
        """Repeats of one workload as one measurement: steps pooled, decode time summed,
        server figures averaged (the cache bytes: the largest seen)."""
        server: dict[str, Any] = {}
        for key in runs[0].server:
            seen = [r.server[key] for r in runs if r.server.get(key) is not None]
            if not seen:
                server[key] = None
            else:
                server[key] = max(seen) if key == "cache_bytes" else float(np.mean(seen))
        return cls(
            [t for r in runs for t in r.step_s],
            sum(r.seconds for r in runs),
            [t for r in runs for t in r.prefill_s],
            runs[0].first_row,
            server,
            sum(r.refused for r in runs),
        )


@dataclass(frozen=True)
class Served:
    """A served contestant: the server, the model, cached or recompute, its /metrics."""

    url: str
    model: str
    cached: bool
    metrics: Callable[[], str]


def server_counters(how: Served) -> dict[str, float]:
    """Batch and padding totals of the model, and the cache bytes reserved, from /metrics."""
    text = how.metrics()
    samples, runs = histogram_totals(text, "mha_batch_size_samples", how.model)
    pad_sum, pad_count = histogram_totals(text, "mha_batch_padding_fraction", how.model)
    found = CACHE_BYTES.search(text)
    cache = float(found[1]) if found else math.nan
    return {
        "samples": samples,
        "runs": runs,
        "pad_sum": pad_sum,
        "pad_count": pad_count,
        "cache_bytes": cache,
    }


class Refusals:
    """UNAVAILABLE refusals met by one run's requests (each sent again)."""

    def __init__(self) -> None:
        self.count = 0


async def _exchange(
    stream: AsyncStream,
    model: str,
    query: np.ndarray,
    sequence: SequenceStep | None,
    refusals: Refusals,
) -> tuple[np.ndarray, float]:
    """Send one request and wait for its answer: (the last output row [E], seconds)."""
    began = time.perf_counter()
    for attempt in range(1, RETRIES + 2):
        await stream.send(model, {contract.QUERY: query}, sequence=sequence)
        answer = await stream.receive()
        error = answer.error
        if error is None or error.code != grpc.StatusCode.UNAVAILABLE or attempt > RETRIES:
            break
        refusals.count += 1  # refused before any compute: the sequence is unchanged
        await asyncio.sleep(RETRY_PAUSE_S * attempt)
    seconds = time.perf_counter() - began
    if answer.error is not None:
        raise answer.error
    assert answer.result is not None
    return answer.result.outputs[contract.OUTPUT][0, -1], seconds


async def _decode_steps(
    stream: AsyncStream,
    how: Served,
    tokens: np.ndarray,
    workload: Workload,
    sequence_id: str,
    refusals: Refusals,
) -> tuple[list[float], np.ndarray]:
    """One sequence's steps in a closed loop; step k adds token P + k - 1."""
    seconds, row = [], np.zeros(0, DTYPE)
    for k in range(1, workload.steps + 1):
        control: SequenceStep | None = None
        if how.cached:
            query = tokens[:, workload.prompt + k - 1 : workload.prompt + k]
            control = SequenceStep(sequence_id)
        else:
            query = tokens[:, : workload.prompt + k]
        row, took = await _exchange(stream, how.model, query, control, refusals)
        seconds.append(took)
    return seconds, row


async def _finish(stream: AsyncStream) -> None:
    """End the request side and wait until the server ends the stream (and its sequences)."""
    await stream.close()
    with contextlib.suppress(ClientError):
        await stream.receive()


@contextlib.asynccontextmanager
async def _streams(client: AsyncClient, count: int) -> AsyncIterator[list[AsyncStream]]:
    streams = [client.stream() for _ in range(count)]
    try:
        yield streams
    finally:  # after a failure some are broken already: their errors say nothing new
        await asyncio.gather(*(_finish(s) for s in streams), return_exceptions=True)


async def _decode_served(
    how: Served, workload: Workload, tokens: list[np.ndarray], tag: str
) -> Measured:
    ids = [f"{tag}-{i}" for i in range(len(tokens))]
    refusals = Refusals()
    async with AsyncClient(how.url, timeout=None) as client, _streams(client, len(ids)) as streams:
        prefill: list[float] = []
        if how.cached:
            prompts = [
                _exchange(
                    s, how.model, t[:, : workload.prompt], SequenceStep(i, start=True), refusals
                )
                for s, t, i in zip(streams, tokens, ids, strict=True)
            ]
            prefill = [took for _, took in await asyncio.gather(*prompts)]
        before = server_counters(how)
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(
                _decode_steps(s, how, t, workload, i, refusals)
                for s, t, i in zip(streams, tokens, ids, strict=True)
            )
        )
        seconds = time.perf_counter() - started
        after = server_counters(how)  # the sequences are still live: their caches count
    server = {
        **counter_deltas(before, after),
        "cache_bytes": after["cache_bytes"] if how.cached else None,
    }
    steps = [t for step_s, _ in runs for t in step_s]
    return Measured(steps, seconds, prefill, runs[0][1], server, refusals.count)


def decode_served(how: Served, workload: Workload, width: int, seed: int, tag: str) -> Measured:
    """Decode `workload` against a server (see the module docstring)."""
    tokens = sequence_tokens(workload, width, seed)
    return asyncio.run(_decode_served(how, workload, tokens, tag))


def decode_in_process(session: Any, workload: Workload, width: int, seed: int) -> Measured:
    """One sequence through the step graph in this process, its cache in two numpy buffers
    (filled rows handed to ONNX Runtime as views, the step's new rows appended)."""
    [tokens] = sequence_tokens(Workload(workload.prompt, workload.steps, 1), width, seed)
    keys = np.empty((1, workload.context, width), DTYPE)
    values = np.empty_like(keys)

    def step(length: int, new: int) -> tuple[np.ndarray, float]:
        began = time.perf_counter()
        query = tokens[:, length : length + new]
        feeds = decoding.step_inputs(query, keys[:, :length], values[:, :length])
        output, new_key, new_value = session.run(list(decoding.STEP_OUTPUTS), feeds)
        keys[:, length : length + new] = new_key
        values[:, length : length + new] = new_value
        return output[0, -1], time.perf_counter() - began

    row, prefill = step(0, workload.prompt)
    started, seconds = time.perf_counter(), []
    for k in range(workload.steps):
        row, took = step(workload.prompt + k, 1)
        seconds.append(took)
    return Measured(seconds, time.perf_counter() - started, [prefill], row)
