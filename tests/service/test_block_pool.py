"""The paged KV cache without a model: the block pool, the block tables, the store's ends."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mha.service.core.block_pool import BlockPool
from mha.service.core.block_tables import BlockTable, BlockTables, CacheLayout
from mha.service.core.errors import ResourceExhausted
from mha.service.core.sequences import SequenceLimits, SequenceStore

E = 8
F32 = np.dtype(np.float32)
LAYOUT = CacheLayout(E, F32, max_context=64)  # 16 blocks of 4 tokens at most a sequence


def rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, E)).astype(np.float32)


def test_pool_hands_out_runs_with_headroom_and_takes_them_back() -> None:
    pool = BlockPool(blocks=40, block_tokens=4, row_size=E, dtype=F32, headroom=10)
    first = pool.take(3)
    second = pool.take(2)
    assert first == [0, 1, 2]
    assert second == [13, 14]  # 10 blocks of room after the first run
    assert pool.take(2, after=2) == [3, 4]  # the first run grows in place
    assert (pool.in_use, pool.free) == (7, 33)
    pool.give_back(first)
    assert pool.free == 36
    with pytest.raises(ValueError, match="were free"):
        pool.give_back([0])
    with pytest.raises(ValueError, match="37 blocks asked of a pool with 36 free"):
        pool.take(37)


def test_a_full_pool_places_in_the_widest_gap_then_scatters() -> None:
    pool = BlockPool(blocks=10, block_tokens=4, row_size=E, dtype=F32, headroom=100)
    assert pool.take(2) == [0, 1]
    assert pool.take(2) == [5, 6]  # no room for the headroom: the middle of the widest gap
    assert pool.take(4) == [2, 3, 4, 7]  # no run of 4 is free: scattered
    assert pool.take_run(3) is None and pool.take_run(2) == [8, 9]


def test_bytes_held_follow_the_rows_a_block_at_a_time() -> None:
    block_bytes = 4 * LAYOUT.row_bytes
    tables = BlockTables(budget_bytes=5 * block_bytes, block_tokens=4)
    table = BlockTable(tables.pool("m", LAYOUT))
    tables.grow(table, 5, "sequence 1 starting", holders=0)
    assert tables.held_bytes == 2 * block_bytes
    tables.write(table, rows(5, 0), rows(5, 1))
    assert tables.rows_bytes == 5 * LAYOUT.row_bytes
    with pytest.raises(ResourceExhausted) as refused:
        tables.grow(table, 21, "sequence 1 growing to 24 tokens", holders=1)
    assert refused.value.message == (
        f"sequence 1 growing to 24 tokens needs {4 * block_bytes} more cache bytes; "
        f"{2 * block_bytes} of the budget of {5 * block_bytes} (--kv-cache-bytes) are in use "
        f"by 1 sequences; end some or retry later"
    )
    tables.release(table)
    assert (tables.held_bytes, tables.rows_bytes, table.blocks) == (0, 0, [])


def test_consecutive_blocks_read_in_place_across_block_boundaries() -> None:
    tables = BlockTables(budget_bytes=1 << 20, block_tokens=4)
    table = BlockTable(tables.pool("m", LAYOUT))
    keys, values = rows(11, 2), rows(11, 3)
    for start, end in ((0, 3), (3, 4), (4, 9), (9, 11)):  # steps crossing block ends
        tables.grow(table, end, "growing", holders=1)
        tables.write(table, keys[start:end], values[start:end])
    read_keys, read_values = table.rows()
    assert len(table.blocks) == 3 and table.contiguous
    assert np.shares_memory(read_keys, table.pool.keys)  # a view: no copy of the past
    np.testing.assert_array_equal(read_keys, keys)
    np.testing.assert_array_equal(read_values, values)


def test_a_blocked_table_moves_to_a_new_run_once_else_reads_two_runs() -> None:
    layout = CacheLayout(E, F32, max_context=8)  # headroom 2 blocks
    tables = BlockTables(budget_bytes=12 * 4 * layout.row_bytes, block_tokens=4)
    pool = tables.pool("m", layout)
    a, b = BlockTable(pool), BlockTable(pool)
    keys, values = rows(28, 4), rows(28, 5)
    tables.grow(a, 4, "a", holders=1)
    tables.write(a, keys[:4], values[:4])
    tables.grow(b, 4, "b", holders=2)
    assert (a.blocks, b.blocks) == ([0], [3])
    tables.grow(a, 16, "a growing", holders=2)  # blocks 1-3 are not all free: it moves
    assert a.blocks == [6, 7, 8, 9]
    tables.write(a, keys[4:16], values[4:16])
    tables.grow(b, 12, "b growing", holders=2)  # in place: 3, 4, 5
    tables.grow(a, 28, "a growing again", holders=2)  # no run of 7 free: 0-2 after 6-9
    assert a.blocks == [6, 7, 8, 9, 0, 1, 2] and not a.contiguous
    tables.write(a, keys[16:], values[16:])
    read_keys, read_values = a.rows()
    np.testing.assert_array_equal(read_keys, keys)
    np.testing.assert_array_equal(read_values, values)
    assert b.blocks == [3, 4, 5]
    assert tables.held_bytes == 10 * pool.block_bytes


def test_a_sequence_ended_during_a_step_keeps_its_blocks_until_the_step_leaves() -> None:
    store = SequenceStore(SequenceLimits(cache_bytes=1 << 20, max_sequences=4, idle_seconds=60))

    async def closed_mid_step() -> None:
        sequence = await store.enter(("m", 1, "s"), LAYOUT, start=True, owner="stream")
        store.make_room(sequence, 3)
        assert store.release_owner("stream") == 1  # the stream closed while the step ran
        pool = sequence.table.pool
        assert pool.in_use == 1 and "s" not in {k[2] for k in store.active}
        store.append(sequence, rows(3, 6), rows(3, 7))  # the step's rows land in its own block
        store.leave(sequence, end=False)
        assert pool.in_use == 0 and store.used_bytes == 0

    asyncio.run(closed_mid_step())


def test_a_budget_past_the_memory_is_refused_at_the_pool_not_mapped() -> None:
    block_bytes = 4 * LAYOUT.row_bytes
    tables = BlockTables(budget_bytes=1 << 50, block_tokens=4, memory_bytes=3 * block_bytes)
    pool = tables.pool("m", LAYOUT)
    table = BlockTable(pool)
    tables.grow(table, 12, "sequence 1 starting", holders=0)
    assert pool.blocks == 3
    with pytest.raises(ResourceExhausted) as refused:
        tables.grow(table, 13, "sequence 1 growing to 16 tokens", holders=1)
    assert refused.value.message == (
        "sequence 1 growing to 16 tokens needs 1 more cache blocks; 3 of the 3 its model's "
        "pool holds (the memory the server may use) are in use; end some or retry later"
    )
    assert tables.held_bytes == 3 * block_bytes
