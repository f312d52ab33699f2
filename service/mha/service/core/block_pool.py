"""A pool of fixed-size KV cache blocks: hands blocks out and takes them back.

It knows nothing of requests or sequences (block_tables maps a sequence to its blocks):
a block is `block_tokens` rows of keys and as many of values, [block_tokens, E] each, in
two arenas (keys, values) of `blocks` blocks. Block b holds arena rows
[b * block_tokens, (b + 1) * block_tokens), so a run of consecutive blocks is one
contiguous stretch of rows, which a step reads as a view, without a copy.

Where blocks go keeps those runs long. A new run starts `headroom` blocks after the run
before it (room for that one to grow into), first fit; a run grows into the block after
its last when that is free. Only when the arena is too full for that does a run start in
the middle of the largest free stretch, and at the last scattered blocks anywhere.

The arenas are anonymous memory maps: the kernel gives a page only when it is first
written, so an arena as large as the whole cache budget costs what its written blocks
hold. Unlike numpy's own large allocations they are not marked for transparent huge pages,
which would make every sparse block cost 2 MiB.
"""

from __future__ import annotations

import mmap

import numpy as np


class BlockPool:
    """`blocks` blocks of `block_tokens` rows of `row_size` values of `dtype`, keys and values."""

    def __init__(
        self, blocks: int, block_tokens: int, row_size: int, dtype: np.dtype, headroom: int = 0
    ) -> None:
        if blocks < 1 or block_tokens < 1 or row_size < 1:
            raise ValueError(
                f"a block pool needs blocks, block_tokens and row_size >= 1, got "
                f"{blocks}, {block_tokens}, {row_size}"
            )
        self.blocks = blocks
        self.block_tokens = block_tokens
        self.headroom = max(0, headroom)
        rows = blocks * block_tokens
        self.keys = _arena(rows, row_size, dtype)  # [blocks * block_tokens, E]
        self.values = _arena(rows, row_size, dtype)
        self._free = np.ones(blocks, dtype=bool)
        self.in_use = 0

    @property
    def free(self) -> int:
        return self.blocks - self.in_use

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: its key rows and its value rows."""
        return 2 * self.block_tokens * self.keys.shape[1] * self.keys.itemsize

    def take(self, count: int, after: int | None = None) -> list[int]:
        """`count` free blocks, consecutive where they can be: right after block `after`
        when those are free, else a new run (see the module docstring). ValueError when
        fewer than `count` are free (the caller's budget keeps that from happening)."""
        if count <= 0:
            return []
        if count > self.free:
            raise ValueError(f"{count} blocks asked of a pool with {self.free} free")
        if after is not None and self.run_free(after + 1, count):
            start: int | None = after + 1
        else:
            start = self.place(count)
        if start is not None:
            chosen = list(range(start, start + count))
        else:
            chosen = [int(b) for b in np.flatnonzero(self._free)[:count]]
        self._free[chosen] = False
        self.in_use += count
        return chosen

    def give_back(self, blocks: list[int]) -> None:
        """Free the blocks (each must be in use)."""
        if not blocks:
            return
        if self._free[blocks].any():
            raise ValueError(f"blocks given back that were free: {blocks}")
        self._free[blocks] = True
        self.in_use -= len(blocks)

    def take_run(self, count: int) -> list[int] | None:
        """`count` consecutive free blocks placed as a new run, or None if none are."""
        start = self.place(count) if 0 < count <= self.free else None
        if start is None:
            return None
        self._free[start : start + count] = False
        self.in_use += count
        return list(range(start, start + count))

    def run_free(self, start: int, count: int) -> bool:
        """Blocks start .. start + count - 1 exist and are all free."""
        end = start + count
        return start >= 0 and end <= self.blocks and bool(self._free[start:end].all())

    def place(self, count: int) -> int | None:
        """The first block of a new run of `count`, or None when no stretch is long enough."""
        starts, lengths = self._stretches()
        if not len(starts):
            return None
        # headroom after a used block, none at the arena's start
        offsets = np.where(starts > 0, self.headroom, 0)
        fits = np.flatnonzero(lengths >= offsets + count)
        if len(fits):
            first = fits[0]
            return int(starts[first] + offsets[first])
        widest = int(np.argmax(lengths))
        if lengths[widest] < count:
            return None
        return int(starts[widest] + (lengths[widest] - count) // 2)

    def _stretches(self) -> tuple[np.ndarray, np.ndarray]:
        """Start and length of every run of free blocks, in arena order."""
        free = self._free
        changes = np.flatnonzero(free[1:] != free[:-1]) + 1  # where a run begins
        bounds = np.concatenate((np.zeros(1, np.intp), changes, np.full(1, len(free), np.intp)))
        starts = bounds[:-1]
        chosen = free[starts]
        return starts[chosen], (bounds[1:] - starts)[chosen]


def _arena(rows: int, row_size: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised [rows, row_size] array over anonymous memory, pages given lazily."""
    nbytes = rows * row_size * dtype.itemsize
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, dtype=dtype).reshape(rows, row_size)
