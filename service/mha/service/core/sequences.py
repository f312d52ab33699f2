"""Sequences of stateful models: each one's KV cache, held within one byte budget.

A sequence is (model, version, sequence_id). Its cache is two buffers of `capacity` rows
[capacity, E] (the projected keys and values of its tokens so far, contract.PAST_KEY /
PAST_VALUE), of which the first `length` rows are filled: a step reads a view of them
(no copy for a step that runs alone) and appends the step's new rows. The capacity grows
by doubling (amortised O(1) copy per token), capped at the model's maximum context.

Memory is bounded and visible: every buffer is reserved against one server-wide budget
before it is allocated (a new sequence or a growth that does not fit is refused with
RESOURCE_EXHAUSTED, never an out-of-memory), the number of active sequences is capped, a
sequence idle for longer than the idle timeout is evicted (its next request is told so),
and sequences started on a stream end with it.

Requests of one sequence run one at a time in arrival order: each takes the sequence's
asyncio.Lock (FIFO) before it touches the cache; a second concurrent request waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mha.service.core.errors import NotFound, OutOfRange, ResourceExhausted
from mha.service.core.metrics import Metrics

log = logging.getLogger(__name__)

SequenceId = int | str
SequenceKey = tuple[str, int, SequenceId]  # model, version, sequence_id
MIN_CAPACITY = 16  # rows a new cache starts with (a prompt longer than that gets its own size)
REMEMBERED_EVICTIONS = 4096  # ids whose eviction the next request is told about


def describe(key: SequenceKey) -> str:
    model, version, sequence_id = key
    return f"sequence {sequence_id!r} of model {model!r} version {version}"


@dataclass(frozen=True)
class CacheLayout:
    """One model version's cache rows: E values of `dtype` per row, at most max_context."""

    row_size: int
    dtype: np.dtype
    max_context: int

    def nbytes(self, capacity: int) -> int:
        """Bytes of both buffers (keys and values) for `capacity` rows."""
        return 2 * capacity * self.row_size * self.dtype.itemsize


@dataclass(eq=False)
class Sequence:
    """One active sequence: its cache buffers, filled length and turn-taking lock."""

    key: SequenceKey
    layout: CacheLayout
    keys: np.ndarray  # [capacity, E]
    values: np.ndarray  # [capacity, E]
    length: int = 0
    mask: np.ndarray | None = None  # a memory's key_padding_mask [S] (True = padding)
    owner: Hashable | None = None  # the stream that started it, if any
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # requests holding or waiting for the lock (never evicted meanwhile)

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)

    def past(self) -> tuple[np.ndarray, np.ndarray]:
        """Views [1, length, E] of the filled rows (contiguous: rows are the leading axis)."""
        return self.keys[None, : self.length], self.values[None, : self.length]

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append the new rows [T, E]; the caller made room for them."""
        end = self.length + keys.shape[0]
        self.keys[self.length : end] = keys
        self.values[self.length : end] = values
        self.length = end


@dataclass(frozen=True)
class Eviction:
    reason: str  # "idle", "stream_closed", "budget"
    detail: str


@dataclass(frozen=True)
class SequenceLimits:
    """Server-wide: the cache budget, the most active sequences, the idle timeout."""

    cache_bytes: int
    max_sequences: int
    idle_seconds: float


class SequenceStore:
    """Every active sequence of a server, within SequenceLimits (event loop only, no locks)."""

    def __init__(self, limits: SequenceLimits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        # Least recently used first: a sequence moves to the end whenever it is left, so the
        # idle ones are found at the front without visiting every active sequence.
        self.active: dict[SequenceKey, Sequence] = {}
        self.used_bytes = 0
        self._evicted: collections.OrderedDict[SequenceKey, Eviction] = collections.OrderedDict()

    async def enter(
        self, key: SequenceKey, layout: CacheLayout, *, start: bool, owner: Hashable | None
    ) -> Sequence:
        """The sequence, its lock taken (in arrival order); a start begins it anew.

        NotFound for a request without start to a sequence that is not active (saying when
        it was evicted and why); ResourceExhausted when a new one does not fit.
        """
        self.evict_idle()
        sequence = self.active.get(key)
        if sequence is None:
            if not start:
                raise self._not_active(key)
            sequence = self._create(key, layout, owner)
        sequence.users += 1
        try:
            await sequence.lock.acquire()
        except BaseException:
            sequence.users -= 1
            raise
        if self.active.get(key) is not sequence:  # ended while this request waited
            self._leave_lock(sequence)
            return await self.enter(key, layout, start=start, owner=owner)
        if start:
            sequence.length = 0
            sequence.mask = None
            sequence.owner = owner
        return sequence

    def leave(self, sequence: Sequence, *, end: bool) -> None:
        """Release the sequence's lock; end it (free its cache) if asked."""
        self._leave_lock(sequence)
        if end:
            self.end(sequence.key)

    def _leave_lock(self, sequence: Sequence) -> None:
        sequence.users -= 1
        sequence.last_used = time.monotonic()
        if self.active.get(sequence.key) is sequence:
            self.active[sequence.key] = self.active.pop(sequence.key)  # now the most recent
        sequence.lock.release()

    def make_room(self, sequence: Sequence, tokens: int) -> None:
        """Grow the cache so `tokens` more rows fit: OutOfRange past the maximum context,
        ResourceExhausted when the budget cannot hold the larger buffers."""
        needed = sequence.length + tokens
        layout = sequence.layout
        if needed > layout.max_context:
            raise OutOfRange(
                f"{describe(sequence.key)}: {sequence.length} tokens + {tokens} new would be "
                f"{needed}, over the model's maximum context of {layout.max_context}"
            )
        if needed <= sequence.capacity:
            return
        capacity = min(layout.max_context, max(needed, 2 * sequence.capacity))
        grow = layout.nbytes(capacity) - sequence.nbytes
        self._reserve(grow, f"{describe(sequence.key)} growing to {capacity} tokens")
        keys = np.empty((capacity, layout.row_size), layout.dtype)
        values = np.empty_like(keys)
        keys[: sequence.length] = sequence.keys[: sequence.length]
        values[: sequence.length] = sequence.values[: sequence.length]
        sequence.keys, sequence.values = keys, values
        self._changed()

    def end(self, key: SequenceKey) -> None:
        """Free a sequence's cache (no-op if it is not active)."""
        sequence = self.active.pop(key, None)
        if sequence is not None:
            self.used_bytes -= sequence.nbytes
            self._changed()

    def evict_idle(self, now: float | None = None) -> int:
        """Evict the sequences idle past the timeout that no request holds; return how many."""
        now = time.monotonic() if now is None else now
        idle = []
        for s in self.active.values():  # least recently used first
            if now - s.last_used <= self.limits.idle_seconds:
                break  # every later one was used more recently
            if s.users == 0:
                idle.append(s)
        for sequence in idle:
            waited = now - sequence.last_used
            detail = (
                f"evicted after {waited:.0f} s idle (the idle timeout is "
                f"{self.limits.idle_seconds:g} s)"
            )
            self._evict(sequence.key, Eviction("idle", detail))
        return len(idle)

    def release_owner(self, owner: Hashable) -> int:
        """End the sequences a closed stream started (and no request holds); return how many."""
        owned = [s for s in self.active.values() if s.owner == owner]
        for sequence in owned:
            self._evict(sequence.key, Eviction("stream_closed", "ended with the stream it ran on"))
        return len(owned)

    def _evict(self, key: SequenceKey, eviction: Eviction) -> None:
        self.end(key)
        self._evicted[key] = eviction
        while len(self._evicted) > REMEMBERED_EVICTIONS:
            self._evicted.popitem(last=False)
        log.info("%s %s", describe(key), eviction.detail)
        if self.metrics is not None:
            self.metrics.sequence_evictions.labels(key[0], str(key[1]), eviction.reason).inc()

    def _not_active(self, key: SequenceKey) -> NotFound:
        eviction = self._evicted.get(key)
        if eviction is not None:
            return NotFound(
                f"{describe(key)} is not active: {eviction.detail}; start it again with "
                f"sequence_start"
            )
        return NotFound(f"{describe(key)} is not active; its first request must set sequence_start")

    def _create(self, key: SequenceKey, layout: CacheLayout, owner: Hashable | None) -> Sequence:
        if len(self.active) >= self.limits.max_sequences:
            raise ResourceExhausted(
                f"{describe(key)}: {len(self.active)} sequences are active, the server's "
                f"maximum (--max-sequences {self.limits.max_sequences}); end one or retry later"
            )
        capacity = min(layout.max_context, MIN_CAPACITY)
        self._reserve(layout.nbytes(capacity), f"{describe(key)} starting")
        keys = np.empty((capacity, layout.row_size), layout.dtype)
        sequence = Sequence(key, layout, keys, np.empty_like(keys), owner=owner)
        self.active[key] = sequence
        self._evicted.pop(key, None)
        self._changed()
        return sequence

    def _reserve(self, nbytes: int, what: str) -> None:
        if self.used_bytes + nbytes > self.limits.cache_bytes:
            raise ResourceExhausted(
                f"{what} needs {nbytes} more cache bytes; {self.used_bytes} of the budget of "
                f"{self.limits.cache_bytes} (--kv-cache-bytes) are in use by "
                f"{len(self.active)} sequences; end some or retry later"
            )
        self.used_bytes += nbytes

    def _changed(self) -> None:
        if self.metrics is not None:
            self.metrics.sequences_active.set(len(self.active))
            self.metrics.cache_bytes.set(self.used_bytes)


def machine_cache_bytes(fraction: float = 0.25) -> int:
    """The default cache budget: a quarter of the memory this process may use.

    The cgroup v2 memory.max when a container sets one, else the machine's MemTotal.
    """
    limit = None
    with contextlib.suppress(OSError, ValueError):
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        limit = None if text == "max" else int(text)
    if limit is None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    limit = int(line.split()[1]) * 1024
    return int((limit or 4 << 30) * fraction)
