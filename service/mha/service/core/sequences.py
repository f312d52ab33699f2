"""Sequences of stateful models: each one's KV cache, held within one byte budget.

A sequence is (model, version, sequence_id). Its cache is a block table
(mha.service.core.block_tables): the projected keys and values of its tokens so far
(contract.PAST_KEY / PAST_VALUE) in fixed-size blocks of its model version's pool, taken a
block at a time as it grows and given back when it ends or is evicted. A step reads the
filled rows in place (a view, no copy, while its blocks are consecutive) and appends the
step's new rows.

Memory is bounded and visible: every block is charged against one server-wide budget
before it is used (a new sequence or a growth that does not fit is refused with
RESOURCE_EXHAUSTED, never an out-of-memory), the number of active sequences is capped, a
sequence idle for longer than the idle timeout is evicted (its next request is told so),
and sequences started on a stream end with it. A sequence ended while a request still
holds it (its stream closed mid-step) keeps its blocks until that request leaves, so no
block is handed to another sequence while a step may still read or write it.

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

from mha.service.core.block_pool import BlockPool
from mha.service.core.block_tables import (
    DEFAULT_BLOCK_TOKENS,
    BlockTable,
    BlockTables,
    CacheLayout,
)
from mha.service.core.errors import NotFound, OutOfRange, ResourceExhausted
from mha.service.core.metrics import Metrics

log = logging.getLogger(__name__)

SequenceId = int | str
SequenceKey = tuple[str, int, SequenceId]  # model, version, sequence_id
REMEMBERED_EVICTIONS = 4096  # ids whose eviction the next request is told about


def describe(key: SequenceKey) -> str:
    model, version, sequence_id = key
    return f"sequence {sequence_id!r} of model {model!r} version {version}"


@dataclass(eq=False)
class Sequence:
    """One active sequence: its block table, filled length and turn-taking lock."""

    key: SequenceKey
    layout: CacheLayout
    table: BlockTable
    mask: np.ndarray | None = None  # a memory's key_padding_mask [S] (True = padding)
    owner: Hashable | None = None  # the stream that started it, if any
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # requests holding or waiting for the lock (never evicted meanwhile)
    ended: bool = False  # ended while a request held it: its blocks go when that one leaves

    @property
    def length(self) -> int:
        return self.table.length

    @property
    def capacity(self) -> int:
        return self.table.capacity

    def past(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values [1, length, E] of the filled rows (views while the blocks are
        consecutive)."""
        keys, values = self.table.rows()
        return keys[None], values[None]


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
    block_tokens: int = DEFAULT_BLOCK_TOKENS  # rows per KV block (--kv-block-tokens)


class SequenceStore:
    """Every active sequence of a server, within SequenceLimits (event loop only, no locks)."""

    def __init__(self, limits: SequenceLimits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        # Least recently used first: a sequence moves to the end whenever it is left, so the
        # idle ones are found at the front without visiting every active sequence.
        self.active: dict[SequenceKey, Sequence] = {}
        self.tables = BlockTables(
            limits.cache_bytes, limits.block_tokens, memory_bytes=machine_cache_bytes(1.0)
        )
        if metrics is not None:
            metrics.cache_rows_bytes.set_function(lambda: self.tables.rows_bytes)
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
            self.tables.truncate(sequence.table, 0)
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
        elif sequence.ended and sequence.users == 0:
            self._release(sequence)
        sequence.lock.release()

    def length_of(self, key: SequenceKey) -> int:
        """Rows the sequence holds now (0 when it is not active)."""
        sequence = self.active.get(key)
        return 0 if sequence is None else sequence.length

    def make_room(self, sequence: Sequence, tokens: int) -> None:
        """Take blocks so `tokens` more rows fit: OutOfRange past the maximum context,
        ResourceExhausted when the budget cannot hold the blocks."""
        needed = sequence.length + tokens
        layout = sequence.layout
        if needed > layout.max_context:
            raise OutOfRange(
                f"{describe(sequence.key)}: {sequence.length} tokens + {tokens} new would be "
                f"{needed}, over the model's maximum context of {layout.max_context}"
            )
        if needed <= sequence.capacity:
            return
        block = self.tables.block_tokens
        what = f"{describe(sequence.key)} growing to {-(-needed // block) * block} tokens"
        self.tables.grow(sequence.table, needed, what, len(self.active))
        self._changed()

    def append(self, sequence: Sequence, keys: np.ndarray, values: np.ndarray) -> None:
        """Append a step's new rows [T, E] (make_room made room for them)."""
        self.tables.write(sequence.table, keys, values)  # rows' bytes are read at scrape time

    def truncate(self, sequence: Sequence, length: int) -> None:
        """Forget the rows past `length` (a request that failed after appending some)."""
        self.tables.truncate(sequence.table, length)

    def end(self, key: SequenceKey) -> None:
        """Free a sequence's blocks (no-op if it is not active); if a request still holds
        it, when that request leaves."""
        sequence = self.active.pop(key, None)
        if sequence is None:
            return
        sequence.ended = True
        if sequence.users == 0:
            self._release(sequence)
        else:
            self._changed()

    def _release(self, sequence: Sequence) -> None:
        self.tables.release(sequence.table)
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
        table = BlockTable(self._pool(key, layout))
        self.tables.grow(table, 1, f"{describe(key)} starting", len(self.active))
        sequence = Sequence(key, layout, table, owner=owner)
        self.active[key] = sequence
        self._evicted.pop(key, None)
        self._changed()
        return sequence

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks held by every sequence."""
        return self.tables.held_bytes

    def _pool(self, key: SequenceKey, layout: CacheLayout) -> BlockPool:
        """The model version's block pool; its block gauges read it at scrape time."""
        owner = key[:2]
        known = owner in self.tables.pools
        pool = self.tables.pool(owner, layout)
        if not known and self.metrics is not None:
            blocks = self.metrics.cache_blocks
            labels = (key[0], str(key[1]))
            blocks.labels(*labels, "in_use").set_function(lambda: pool.in_use)
            blocks.labels(*labels, "free").set_function(lambda: self.tables.free_blocks(pool))
        return pool

    def _changed(self) -> None:
        if self.metrics is not None:
            self.metrics.sequences_active.set(len(self.active))
            self.metrics.cache_bytes.set(self.tables.held_bytes)


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
