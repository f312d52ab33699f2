"""Sequence memory is bounded and visible: budget, maximum, idle eviction, context, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import RunningServer, link_repository, settings_for

from mha.client import Client, ClientError, SequenceStep
from mha.service.core.block_tables import DEFAULT_BLOCK_TOKENS, CacheLayout
from mha.service.core.sequences import SequenceLimits, SequenceStore

E = 64
ONE_CACHE = 2 * DEFAULT_BLOCK_TOKENS * E * 4  # bytes of one fp32 block: a new sequence


@pytest.fixture(scope="module")
def kv_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = {"kv": {"target": "ort", "kv_cache": True}}
    return link_repository(tmp_path_factory.mktemp("kv-limits"), exported, models)


def serve(repo: Path, **overrides: object) -> RunningServer:
    return RunningServer(settings_for(repo, **overrides)).load()


def tokens(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, count, E)).astype(np.float32)


def refused(client: Client, sequence: SequenceStep, count: int = 1) -> ClientError:
    with pytest.raises(ClientError) as caught:
        client.infer("kv", {"query": tokens(count)}, sequence=sequence)
    return caught.value


def test_budget_full_refuses_a_new_sequence_until_one_ends(kv_repo: Path) -> None:
    server = serve(kv_repo, kv_cache_bytes=ONE_CACHE)
    try:
        with Client(server.url) as client:
            client.infer("kv", {"query": tokens(2)}, sequence=SequenceStep(1, start=True))
            full = refused(client, SequenceStep(2, start=True))
            assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"of the budget of {ONE_CACHE} (--kv-cache-bytes)" in full.details
            assert "sequence 2 of model 'kv' version 1 starting" in full.details
            client.infer("kv", {"query": tokens(1)}, sequence=SequenceStep(1, end=True))
            client.infer("kv", {"query": tokens(2)}, sequence=SequenceStep(2, start=True))
    finally:
        server.close()


def test_growth_past_the_budget_is_refused_and_the_sequence_keeps_its_tokens(kv_repo) -> None:
    server = serve(kv_repo, kv_cache_bytes=ONE_CACHE)
    try:
        with Client(server.url) as client:
            client.infer("kv", {"query": tokens(3)}, sequence=SequenceStep(1, start=True))
            grow = refused(client, SequenceStep(1), count=DEFAULT_BLOCK_TOKENS)
            assert grow.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "growing to" in grow.details
            client.infer("kv", {"query": tokens(1)}, sequence=SequenceStep(1, end=True))
    finally:
        server.close()


def test_most_sequences(kv_repo: Path) -> None:
    server = serve(kv_repo, max_sequences=2)
    try:
        with Client(server.url) as client:
            for sequence_id in (1, 2):
                client.infer("kv", {"query": tokens(1)}, sequence=SequenceStep(sequence_id, True))
            third = refused(client, SequenceStep(3, start=True))
            assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (
                "2 sequences are active, the server's maximum (--max-sequences 2)" in third.details
            )
    finally:
        server.close()


def test_idle_eviction_finds_the_idle_sequences_whatever_their_order_of_use() -> None:
    """The store keeps sequences least recently used first and its idle scan stops at the
    first recent one: a sequence used again must move behind the others."""
    store = SequenceStore(SequenceLimits(cache_bytes=1 << 30, max_sequences=8, idle_seconds=10))
    layout = CacheLayout(E, np.dtype(np.float32), 64)

    async def use(name: str, start: bool = False) -> None:
        sequence = await store.enter(("kv", 1, name), layout, start=start, owner=None)
        store.leave(sequence, end=False)

    async def started_then_a_again() -> None:
        for name in ("a", "b", "c"):
            await use(name, start=True)
        await use("a")

    asyncio.run(started_then_a_again())
    a, c = store.active[("kv", 1, "a")], store.active[("kv", 1, "c")]
    assert a.last_used > c.last_used
    # Halfway between c's and a's last use, plus the timeout: b and c are past it, a is not.
    # (Not `a.last_used + 10`: that sum minus a.last_used can round to just over 10.)
    now = (a.last_used + c.last_used) / 2 + 10
    assert store.evict_idle(now=now) == 2
    assert list(store.active) == [("kv", 1, "a")]


def test_idle_sequence_is_evicted_and_its_next_request_is_told_why(kv_repo: Path) -> None:
    server = serve(kv_repo, sequence_idle_seconds=0.0)
    try:
        with Client(server.url) as client:
            client.infer("kv", {"query": tokens(2)}, sequence=SequenceStep(8, start=True))
            gone = refused(client, SequenceStep(8))
        assert gone.code == grpc.StatusCode.NOT_FOUND
        assert "sequence 8 of model 'kv' version 1 is not active: evicted after" in gone.details
        assert "idle (the idle timeout is 0 s); start it again with sequence_start" in gone.details
        metrics = server.server.metrics.registry
        labels = {"model": "kv", "version": "1", "reason": "idle"}
        assert metrics.get_sample_value("mha_sequence_evictions_total", labels) == 1
        assert metrics.get_sample_value("mha_sequences_active") == 0
        assert metrics.get_sample_value("mha_sequence_cache_bytes") == 0
    finally:
        server.close()


def test_context_past_the_maximum_is_out_of_range(kv_repo: Path) -> None:
    server = serve(kv_repo, max_sequence_length=8)
    try:
        with Client(server.url) as client:
            client.infer("kv", {"query": tokens(6)}, sequence=SequenceStep(3, start=True))
            over = refused(client, SequenceStep(3), count=3)
            assert over.code == grpc.StatusCode.OUT_OF_RANGE
            assert over.details == (
                "sequence 3 of model 'kv' version 1: 6 tokens + 3 new would be 9, over the "
                "model's maximum context of 8"
            )
            client.infer("kv", {"query": tokens(2)}, sequence=SequenceStep(3, end=True))
    finally:
        server.close()


def test_cache_metrics_follow_the_sequences(kv_repo: Path) -> None:
    server = serve(kv_repo)
    registry = server.server.metrics.registry
    try:
        with Client(server.url) as client:
            client.infer("kv", {"query": tokens(2)}, sequence=SequenceStep("m", start=True))
            assert registry.get_sample_value("mha_sequences_active") == 1
            assert registry.get_sample_value("mha_sequence_cache_bytes") == ONE_CACHE
            client.infer("kv", {"query": tokens(1)}, sequence=SequenceStep("m", end=True))
        assert registry.get_sample_value("mha_sequences_active") == 0
        assert registry.get_sample_value("mha_sequence_cache_bytes") == 0
        steps = registry.get_sample_value(
            "mha_sequence_step_duration_seconds_count", {"model": "kv", "version": "1"}
        )
        assert steps == 2
    finally:
        server.close()
