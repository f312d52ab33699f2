"""Which KV blocks hold each sequence's rows, within one byte budget shared by every model.

A BlockTable is one sequence's list of blocks (of its model version's BlockPool) and the
rows filled. BlockTables hands a table the blocks it grows into, charging the budget a
block at a time, and takes them back when the sequence ends: the bytes held are the rows'
bytes plus at most one part-filled block per sequence (not the capacity doubling of a
contiguous buffer, up to 2x).

Reading: a table whose blocks are consecutive (the pool keeps them so, see block_pool) is
read as a view of the arenas, no copy. A table that could not grow in place moves to a
new run once when one is free (a copy of its rows, as a contiguous buffer's growth did);
only when none is does it keep scattered blocks, and its reads gather them.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from mha.service.core.block_pool import BlockPool
from mha.service.core.errors import ResourceExhausted

DEFAULT_BLOCK_TOKENS = 16  # rows per block (docs/performance.md, "Paged KV cache")


@dataclass(frozen=True)
class CacheLayout:
    """One model version's cache rows: E values of `dtype` per row, at most max_context."""

    row_size: int
    dtype: np.dtype
    max_context: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's key and value rows."""
        return 2 * self.row_size * self.dtype.itemsize

    def nbytes(self, rows: int) -> int:
        """Bytes of both keys and values for `rows` rows."""
        return rows * self.row_bytes


@dataclass(eq=False)
class BlockTable:
    """One sequence's blocks, in order, and how many of their rows are filled."""

    pool: BlockPool
    blocks: list[int] = field(default_factory=list)
    length: int = 0

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_tokens

    @property
    def contiguous(self) -> bool:
        first = self.blocks[0] if self.blocks else 0
        return self.blocks == list(range(first, first + len(self.blocks)))

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values [length, E] of the filled rows: views when the blocks are
        consecutive, gathered copies when they are not."""
        pool, tokens = self.pool, self.pool.block_tokens
        if self.contiguous:
            start = self.blocks[0] * tokens if self.blocks else 0
            end = start + self.length
            return pool.keys[start:end], pool.values[start:end]
        index = self._row_index(0, self.length)
        return pool.keys[index], pool.values[index]

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append rows [T, E] after the filled ones; the blocks must already hold them."""
        start, end = self.length, self.length + keys.shape[0]
        if end > self.capacity:
            raise ValueError(f"{end} rows do not fit in {len(self.blocks)} blocks")
        pool = self.pool
        if self.contiguous:
            base = self.blocks[0] * pool.block_tokens if self.blocks else 0
            pool.keys[base + start : base + end] = keys
            pool.values[base + start : base + end] = values
        else:
            index = self._row_index(start, end)
            pool.keys[index] = keys
            pool.values[index] = values
        self.length = end

    def _row_index(self, start: int, end: int) -> np.ndarray:
        """Arena rows of the table's rows start .. end - 1."""
        tokens = self.pool.block_tokens
        positions = np.arange(start, end)
        blocks = np.asarray(self.blocks, dtype=np.int64)[positions // tokens]
        return blocks * tokens + positions % tokens


class BlockTables:
    """Block pools per model version and the one byte budget they share (event loop only)."""

    def __init__(
        self,
        budget_bytes: int,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        memory_bytes: int | None = None,
    ) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        # A pool's arenas are at most the memory the process may use: the kernel refuses to
        # map more than the machine holds, and a budget past it could never be filled.
        self.arena_bytes = min(budget_bytes, memory_bytes or budget_bytes)
        self.pools: dict[Hashable, BlockPool] = {}
        self.held_bytes = 0  # blocks in use, over every pool
        self.rows_bytes = 0  # filled rows, over every table

    def pool(self, owner: Hashable, layout: CacheLayout) -> BlockPool:
        """The pool of one model version (created on first use, as large as the budget, or
        the memory when that is less)."""
        pool = self.pools.get(owner)
        if pool is None:
            block_bytes = self.block_tokens * layout.row_bytes
            blocks = max(1, self.arena_bytes // block_bytes)
            headroom = -(-layout.max_context // self.block_tokens)  # a whole context
            pool = BlockPool(blocks, self.block_tokens, layout.row_size, layout.dtype, headroom)
            self.pools[owner] = pool
        return pool

    def free_blocks(self, pool: BlockPool) -> int:
        """Blocks of this pool's size the budget has left (shared with every other pool)."""
        return min(pool.free, (self.budget_bytes - self.held_bytes) // pool.block_bytes)

    def grow(self, table: BlockTable, rows: int, what: str, holders: int) -> None:
        """Give the table blocks enough for `rows` rows in all; ResourceExhausted (naming
        `what` and the `holders` of the budget) when the budget cannot hold them."""
        pool = table.pool
        count = -(-rows // pool.block_tokens) - len(table.blocks)
        if count <= 0:
            return
        nbytes = count * pool.block_bytes
        if self.held_bytes + nbytes > self.budget_bytes:
            raise ResourceExhausted(
                f"{what} needs {nbytes} more cache bytes; {self.held_bytes} of the budget of "
                f"{self.budget_bytes} (--kv-cache-bytes) are in use by {holders} sequences; "
                f"end some or retry later"
            )
        if count > pool.free:
            raise ResourceExhausted(
                f"{what} needs {count} more cache blocks; {pool.in_use} of the {pool.blocks} "
                f"its model's pool holds (the memory the server may use) are in use; end "
                f"some or retry later"
            )
        self.held_bytes += nbytes
        last = table.blocks[-1] if table.blocks else None
        if last is not None and not pool.run_free(last + 1, count):
            moved = pool.take_run(len(table.blocks) + count)
            if moved is not None:
                self._move(table, moved)
                return
        table.blocks += pool.take(count, after=last)

    def _move(self, table: BlockTable, blocks: list[int]) -> None:
        """Copy the table's rows to the start of `blocks` (a new run) and free the old."""
        keys, values = table.rows()
        old, length = table.blocks, table.length
        table.blocks, table.length = blocks, 0
        table.write(keys, values)
        table.length = length
        table.pool.give_back(old)

    def write(self, table: BlockTable, keys: np.ndarray, values: np.ndarray) -> None:
        """Append rows [T, E] (room made by grow)."""
        table.write(keys, values)
        self.rows_bytes += keys.nbytes + values.nbytes

    def truncate(self, table: BlockTable, length: int) -> None:
        """Forget the rows past `length` (keeping the blocks: the budget still holds them)."""
        if length < table.length:
            row = 2 * table.pool.keys.shape[1] * table.pool.keys.itemsize
            self.rows_bytes -= (table.length - length) * row
            table.length = length

    def release(self, table: BlockTable) -> None:
        """Give every block of the table back."""
        self.truncate(table, 0)
        table.pool.give_back(table.blocks)
        self.held_bytes -= len(table.blocks) * table.pool.block_bytes
        table.blocks = []
