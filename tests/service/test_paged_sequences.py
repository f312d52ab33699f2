"""The paged cache through a real server: small blocks, a tight budget, chunked prompts.

Every answer must still be the last rows of the full causal forward (sequence_helpers),
whether a sequence's blocks stayed consecutive, moved, or ended up scattered, and whether
its prompt ran in one step or in chunks with other sequences' steps between them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from harness import RunningServer, link_repository, settings_for
from sequence_helpers import E, FullForward, check_steps, chunks, decode_concurrently

from mha.client import Client, SequenceStep

BLOCK = 4  # tokens a block: every test sequence spans many
ROW_BYTES = 2 * E * 4  # one fp32 token's key and value rows


@pytest.fixture(scope="module")
def kv_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = {"kv": {"target": "ort", "kv_cache": True}}
    return link_repository(tmp_path_factory.mktemp("kv-paged"), exported, models)


@pytest.fixture(scope="module")
def server(kv_repo: Path) -> Iterator[RunningServer]:
    """Blocks of 4 tokens, a budget of 64 blocks, prompts in chunks of 3 tokens."""
    settings = settings_for(
        kv_repo, batching=True, kv_block_tokens=BLOCK, kv_cache_bytes=64 * BLOCK * ROW_BYTES,
        prefill_chunk_tokens=3,
    )  # fmt: skip
    running = RunningServer(settings).load()
    yield running
    running.close()


def session_runs(server: RunningServer) -> float:
    registry = server.server.metrics.registry
    labels = {"model": "kv", "version": "1"}
    return sum(
        registry.get_sample_value("mha_session_runs_total", {**labels, "place": place}) or 0.0
        for place in ("loop", "executor")
    )


def test_a_chunked_prompt_equals_the_full_forward_and_holds_its_rows_bytes(
    server: RunningServer, kv_repo: Path
) -> None:
    registry = server.server.metrics.registry
    sent = chunks(np.random.default_rng(11), [11, 1, 1, 2, 1])  # 16 tokens, 4 blocks
    with Client(server.url) as client:
        answers, runs = [], []
        for i, query in enumerate(sent):
            step = SequenceStep("p", start=i == 0)
            before = session_runs(server)
            answers.append(client.infer("kv", {"query": query}, sequence=step).outputs["output"])
            runs.append(session_runs(server) - before)
        assert runs == [4, 1, 1, 1, 1]  # the prompt of 11 in chunks of 3
        assert registry.get_sample_value("mha_sequence_cache_rows_bytes") == 16 * ROW_BYTES
        assert registry.get_sample_value("mha_sequence_cache_bytes") == 16 * ROW_BYTES
        labels = {"model": "kv", "version": "1", "state": "in_use"}
        assert registry.get_sample_value("mha_kv_cache_blocks", labels) == 4
        client.infer("kv", {"query": sent[1]}, sequence=SequenceStep("p", end=True))
    assert registry.get_sample_value("mha_kv_cache_blocks", labels) == 0
    assert registry.get_sample_value("mha_sequence_cache_bytes") == 0
    check_steps(FullForward(kv_repo / "kv" / "1"), sent, answers)


def test_sequences_in_a_crowded_pool_answer_as_alone(server: RunningServer, kv_repo: Path) -> None:
    """12 sequences growing at once in a budget of 64 blocks (a context's headroom does not
    fit): blocks move and scatter, chunked prompts interleave with steps."""
    rng = np.random.default_rng(12)
    plans = {100 + i: chunks(rng, [int(rng.integers(1, 10)), *[1] * 6, 3]) for i in range(12)}

    results = decode_concurrently(server.url, "kv", plans)
    assert server.server.metrics.registry.get_sample_value("mha_sequence_cache_bytes") == 0
    oracle = FullForward(kv_repo / "kv" / "1")
    for sequence_id, answers in zip(plans, results, strict=True):
        check_steps(oracle, plans[sequence_id], answers)


def test_admission_counts_a_step_with_the_past_it_reads(kv_repo: Path) -> None:
    """A step's admitted work is its feeds' elements: the new row and the 2 x 10 past rows
    (counted as its query alone, a long prompt weighed as many steps and held them out)."""
    entered, release, holding = threading.Event(), threading.Event(), threading.Event()

    def wrap(runner):  # type: ignore[no-untyped-def]
        def run(feeds, names):  # type: ignore[no-untyped-def]
            if holding.is_set():
                entered.set()
                release.wait(60)
            return runner(feeds, names)

        return run

    # The held run must be in the executor, so the loop answers meanwhile: no inline runs.
    settings = settings_for(kv_repo, batching=True, inline_runs_under_us=0)
    held = RunningServer(settings, wrap_runner=wrap).load()
    admission = held.server.plane.table.served["kv", 1].admission
    prompt, step = chunks(np.random.default_rng(13), [10, 1])
    try:
        with Client(held.url) as client, ThreadPoolExecutor(1) as pool:
            client.infer("kv", {"query": prompt}, sequence=SequenceStep("w", start=True))
            holding.set()
            stepped = pool.submit(
                client.infer, "kv", {"query": step}, sequence=SequenceStep("w", end=True)
            )
            assert entered.wait(60)
            assert admission.backlog == 1 * E + 2 * 10 * E
            release.set()
            assert stepped.result(60).outputs["output"].shape == (1, 1, E)
    finally:
        release.set()
        held.close()
