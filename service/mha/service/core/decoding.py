"""Continuous batching of decode steps: steps of different sequences in one session run.

A step job's inputs are a sequence model's step graph inputs for B = 1 (mha.contract
step_inputs): query [1, T, E], past_key / past_value [1, P, E] (views of the sequence's
cache) and key_padding_mask [1, P + T] (all False). Steps that are queued together run
as one batch whatever their P and T: past rows are right-padded to the longest P, new rows
to the longest T, and the mask is True on every padded slot, so each real query row sees
exactly its own sequence's keys (the step graph's causal rule, key slot c <= P + t, is the
same for every row of the batch because every row's new tokens start at slot P).

What a step copies: run alone, nothing of the cache (the views go to ONNX Runtime as they
are; the graph itself concatenates past and new keys). Batched, each past is copied once
into the padded batch. Afterwards only the T new rows per sequence are copied into its
cache (mha.service.core.sequences).

The padded batch lives in scratch buffers reused from run to run: memory fresh from the
system costs a page fault per 4 KiB on first touch, which made the copy into a new
(32, 1024, 512) fp32 batch 20-40x slower than into a reused one (measured here: 43-72 ms
vs 1.8 ms for 32 MB). A scratch larger than RETAIN_BYTES is not kept.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from mha import contract
from mha.service.core.padding import Merged, Shape
from mha.service.core.scheduling import JobResult

QUERY, MASK = contract.QUERY, contract.KEY_PADDING_MASK
PAST = (contract.PAST_KEY, contract.PAST_VALUE)
STEP_OUTPUTS = tuple(t.name for t in contract.step_outputs())  # output, new_key, new_value
RETAIN_BYTES = 256 << 20  # the largest scratch kept for reuse


class Scratch:
    """Grow-only flat buffers, one per feed name, that padded batches are laid out in."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype, fill: object) -> np.ndarray:
        """A C-contiguous array of `shape` over this scratch's buffer for `name`, filled."""
        size = int(np.prod(shape))
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.size < size:
            buffer = self.buffers[name] = np.empty(size, dtype)
        view = buffer[:size].reshape(shape)
        view.fill(fill)
        return view

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


def step_inputs(
    query: np.ndarray, past_key: np.ndarray, past_value: np.ndarray
) -> dict[str, np.ndarray]:
    """The step graph's feeds for one sequence: query [1, T, E], past [1, P, E], no padding."""
    tokens = query.shape[1] + past_key.shape[1]
    return {
        QUERY: query,
        contract.PAST_KEY: past_key,
        contract.PAST_VALUE: past_value,
        MASK: np.zeros((1, tokens), dtype=bool),
    }


def chunks(query: np.ndarray, size: int) -> list[np.ndarray]:
    """The new rows [1, T, E] in runs of at most `size` rows (all in one for size 0).

    Chunked prefill: each chunk is a step of its own over the rows before it (the step
    graph's causal rule makes chunk after chunk equal to one run over all of them), and
    each is queued anew, so the steps of other sequences queued meanwhile run between them.
    """
    tokens = query.shape[1]
    if size <= 0 or tokens <= size:
        return [query]
    return [query[:, i : i + size] for i in range(0, tokens, size)]


def joined(results: Sequence[JobResult]) -> JobResult:
    """One request's answer from the results of its chunks, rows in order."""
    if len(results) == 1:
        return results[0]
    outputs = {
        name: np.concatenate([r.outputs[name] for r in results], axis=1)
        for name in results[0].outputs
    }
    return JobResult(
        outputs=outputs,
        queue_ns=sum(r.queue_ns for r in results),
        compute_ns=sum(r.compute_ns for r in results),
        batch_size=max(r.batch_size for r in results),
    )


def _lengths(inputs: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(P, T) of one step job."""
    return int(inputs[contract.PAST_KEY].shape[1]), int(inputs[QUERY].shape[1])


class StepRuns:
    """How decode steps share a session run (padding.RunShaper for sequence models).

    Merges may run in several executor threads at once (runs in flight > 1): each takes a
    scratch of its own from the free list and gives it back in release().
    """

    def __init__(self) -> None:
        self._free: list[Scratch] = []
        self._lock = threading.Lock()

    def _take(self) -> Scratch:
        with self._lock:
            return self._free.pop() if self._free else Scratch()

    def release(self, merged: Merged) -> None:
        scratch = merged.scratch
        if isinstance(scratch, Scratch) and scratch.nbytes <= RETAIN_BYTES:
            with self._lock:
                self._free.append(scratch)

    def shape(self, inputs: Mapping[str, np.ndarray]) -> Shape:
        past, new = _lengths(inputs)
        return Shape(B=1, L=new, S=past + new)  # S = the context the step attends

    def key(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple:
        """Steps of one token share runs with each other only: a prompt's chunk of T rows
        would pad every one-token step of its run to T rows."""
        query = inputs[QUERY]
        return (frozenset(outputs), query.dtype.str, query.shape[2:], query.shape[1] == 1)

    def fraction(self, shapes: Sequence[Shape]) -> float:
        """Padded context slots / all slots of the batch."""
        if not shapes:
            return 0.0
        longest_past = max(s.S - s.L for s in shapes)
        longest_new = max(s.L for s in shapes)
        total = len(shapes) * (longest_past + longest_new)
        real = sum(s.S for s in shapes)
        return 0.0 if total == 0 else (total - real) / total

    def merge(self, jobs: Sequence[Mapping[str, np.ndarray]]) -> Merged:
        """Pad pasts and new rows to the longest, mask every padded slot."""
        lengths = [_lengths(inputs) for inputs in jobs]
        longest_past = max(p for p, _ in lengths)
        longest_new = max(t for _, t in lengths)
        first = jobs[0][QUERY]
        count, row, dtype = len(jobs), first.shape[2], first.dtype
        scratch = self._take()
        feeds = {
            QUERY: scratch.array(QUERY, (count, longest_new, row), dtype, 0),
            **{n: scratch.array(n, (count, longest_past, row), dtype, 0) for n in PAST},
            MASK: scratch.array(MASK, (count, longest_past + longest_new), np.dtype(bool), True),
        }
        for i, (inputs, (past, new)) in enumerate(zip(jobs, lengths, strict=True)):
            feeds[QUERY][i, :new] = inputs[QUERY][0]
            for name in PAST:
                feeds[name][i, :past] = inputs[name][0]
            feeds[MASK][i, :past] = False
            feeds[MASK][i, longest_past : longest_past + new] = False
        spans = [(i, i + 1) for i in range(count)]
        return Merged(feeds, spans, count, longest_new, longest_past + longest_new, scratch)

    def split(
        self,
        outputs: Mapping[str, np.ndarray],
        jobs: Sequence[Mapping[str, np.ndarray]],
        asked: Sequence[Sequence[str]],
        spans: Sequence[tuple[int, int]],
    ) -> list[dict[str, np.ndarray]]:
        """Each sequence's own T rows of every output it asked for."""
        answers = []
        for inputs, names, (i0, i1) in zip(jobs, asked, spans, strict=True):
            new = inputs[QUERY].shape[1]
            answers.append({n: np.ascontiguousarray(outputs[n][i0:i1, :new]) for n in names})
        return answers


MEMORY = (contract.MEMORY_KEY, contract.MEMORY_VALUE)
MEMORY_OUTPUTS = (contract.OUTPUT,)


def memory_step_inputs(
    query: np.ndarray, memory_key: np.ndarray, memory_value: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """A memory step's feeds for one sequence: query [1, T, E], memory [1, S, E], mask [1, S]."""
    return {
        QUERY: query,
        contract.MEMORY_KEY: memory_key,
        contract.MEMORY_VALUE: memory_value,
        MASK: mask,
    }


class MemoryRuns(StepRuns):
    """How steps over held memories share a run: memories padded to the longest S (masked),
    new rows to the longest T (their outputs dropped). Same scratch reuse as StepRuns."""

    @staticmethod
    def _memory_lengths(inputs: Mapping[str, np.ndarray]) -> tuple[int, int]:
        return int(inputs[contract.MEMORY_KEY].shape[1]), int(inputs[QUERY].shape[1])

    def shape(self, inputs: Mapping[str, np.ndarray]) -> Shape:
        memory, new = self._memory_lengths(inputs)
        return Shape(B=1, L=new, S=memory)

    def fraction(self, shapes: Sequence[Shape]) -> float:
        """Padded memory slots / all slots of the batch."""
        if not shapes:
            return 0.0
        total = len(shapes) * max(s.S for s in shapes)
        return (total - sum(s.S for s in shapes)) / total

    def merge(self, jobs: Sequence[Mapping[str, np.ndarray]]) -> Merged:
        lengths = [self._memory_lengths(inputs) for inputs in jobs]
        longest_memory = max(s for s, _ in lengths)
        longest_new = max(t for _, t in lengths)
        first = jobs[0][QUERY]
        count, row, dtype = len(jobs), first.shape[2], first.dtype
        scratch = self._take()
        feeds = {
            QUERY: scratch.array(QUERY, (count, longest_new, row), dtype, 0),
            **{n: scratch.array(n, (count, longest_memory, row), dtype, 0) for n in MEMORY},
            MASK: scratch.array(MASK, (count, longest_memory), np.dtype(bool), True),
        }
        for i, (inputs, (memory, new)) in enumerate(zip(jobs, lengths, strict=True)):
            feeds[QUERY][i, :new] = inputs[QUERY][0]
            for name in MEMORY:
                feeds[name][i, :memory] = inputs[name][0]
            feeds[MASK][i, :memory] = inputs[MASK][0]
        spans = [(i, i + 1) for i in range(count)]
        return Merged(feeds, spans, count, longest_new, longest_memory, scratch)
