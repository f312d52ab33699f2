"""The load of `mha bench memory`: sequences stepping over a cross-attention memory.

One AsyncClient (one channel) and one ModelStreamInfer stream per sequence, each a closed
loop (its next step goes out when the previous answer came back), like `mha bench decode`:
with N sequences up to N steps wait in the server at once and batching can merge them.
Every step is one query token [1, 1, E] attending the sequence's memory of S tokens
(key / value [1, S, E], the last S/8 of them padding). Two ways to get a step's output:
  cached  the memory model: the first step carries the memory with sequence_start, the
          server projects it once and holds it; later steps send the query alone.
  resend  the stateless cross model: every step sends query + key + value + mask, and the
          server projects the whole memory again.
Every step is timed, the first included (cached: the request that brings the memory).
/metrics is read while the sequences are live; closing the streams ends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import numpy as np

from mha import contract
from mha.bench.decode_load import DTYPE, Measured, Served, server_counters
from mha.bench.run import counter_deltas
from mha.client import AsyncClient, AsyncStream, SequenceStep, core

Inputs = dict[str, np.ndarray]
PADDED_SHARE = 8  # the last S // 8 memory tokens are padding, so the mask matters


@dataclass(frozen=True)
class MemoryWorkload:
    """`sequences` sequences at once, each `steps` steps of one token over S memory tokens."""

    memory: int  # S
    steps: int
    sequences: int

    @property
    def label(self) -> str:
        return f"S={self.memory} x{self.sequences}"


@dataclass(frozen=True)
class SequenceData:
    """One sequence's memory (key, value [1, S, E], key_padding_mask [1, S]) and queries."""

    memory: Inputs
    queries: np.ndarray  # [1, steps, E], one per step


def sequence_data(workload: MemoryWorkload, width: int, seed: int) -> list[SequenceData]:
    """Each sequence's tensors, seeded by (seed, S, index): sequence i of a memory length is
    the same for every contestant and sequence count, so their answers can be compared."""
    found = []
    for i in range(workload.sequences):
        rng = np.random.default_rng((seed, workload.memory, i))
        key, value = (rng.standard_normal((1, workload.memory, width)).astype(DTYPE) for _ in "kv")
        mask = np.zeros((1, workload.memory), bool)
        mask[0, workload.memory - workload.memory // PADDED_SHARE :] = True
        memory = {contract.KEY: key, contract.VALUE: value, contract.KEY_PADDING_MASK: mask}
        queries = rng.standard_normal((1, workload.steps, width)).astype(DTYPE)
        found.append(SequenceData(memory, queries))
    return found


def step_request(
    how: Served, data: SequenceData, step: int, sequence_id: str
) -> tuple[Inputs, SequenceStep | None]:
    """What step `step` sends: its inputs and, for the memory model, its sequence control."""
    query = {contract.QUERY: data.queries[:, step : step + 1]}
    if not how.cached:
        return {**query, **data.memory}, None
    if step == 0:
        return {**query, **data.memory}, SequenceStep(sequence_id, start=True)
    return query, SequenceStep(sequence_id)


def request_bytes(how: Served, data: SequenceData, steps: int, sequence_id: str) -> list[int]:
    """The serialized ModelInferRequest size of every step of one sequence, as sent."""
    sizes = []
    for step in range(steps):
        inputs, control = step_request(how, data, step, sequence_id)
        request = core.infer_request(how.model, inputs, sequence=control)
        sizes.append(len(request.SerializeToString()))
    return sizes


async def _run_sequence(
    stream: AsyncStream, how: Served, data: SequenceData, sequence_id: str
) -> tuple[list[float], np.ndarray]:
    """One sequence's steps in a closed loop: (each step's seconds, the last output row [E])."""
    seconds, row = [], np.zeros(0, DTYPE)
    for step in range(data.queries.shape[1]):
        inputs, control = step_request(how, data, step, sequence_id)
        began = time.perf_counter()
        await stream.send(how.model, inputs, sequence=control)
        answer = await stream.receive()
        seconds.append(time.perf_counter() - began)
        if answer.error is not None:
            raise answer.error
        assert answer.result is not None
        row = answer.result.outputs[contract.OUTPUT][0, -1]
    return seconds, row


async def _run_served(how: Served, data: list[SequenceData], ids: list[str]) -> Measured:
    async with AsyncClient(how.url, timeout=None) as client, contextlib.AsyncExitStack() as stack:
        # A stream's own context: done writing on success, cancelled on a failure.
        streams = [await stack.enter_async_context(client.stream()) for _ in ids]
        before = server_counters(how)
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(_run_sequence(s, how, d, i) for s, d, i in zip(streams, data, ids, strict=True))
        )
        seconds = time.perf_counter() - started
        after = server_counters(how)  # the sequences are still live: their memories count
    server = {
        **counter_deltas(before, after),
        "cache_bytes": after["cache_bytes"] if how.cached else None,
    }
    steps = [t for step_s, _ in runs for t in step_s]
    first_steps = [step_s[0] for step_s, _ in runs]
    return Measured(steps, seconds, first_steps, runs[0][1], server)


def run_served(how: Served, workload: MemoryWorkload, width: int, seed: int, tag: str) -> Measured:
    """Step `workload` against a server (see the module docstring); Measured.prefill_s holds
    each sequence's first step (cached: the one that brings the memory)."""
    data = sequence_data(workload, width, seed)
    ids = [f"{tag}-{i}" for i in range(workload.sequences)]
    return asyncio.run(_run_served(how, data, ids))
