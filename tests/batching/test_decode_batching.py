"""Continuous batching of decode steps: any mix of sequences, batched, equals each alone.

Real sessions of a kv-cache export. Every sequence first decodes its own tokens alone to
build a cache; then one step of every sequence runs in a single batched session call
(decoding.StepRuns pads the pasts and new rows and masks them) and each sequence's rows
must equal that step run alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from batching_helpers import CountingRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mha import contract
from mha.service.core.batching import BatchingOptions, BatchingScheduler
from mha.service.core.decoding import (
    MEMORY_OUTPUTS,
    STEP_OUTPUTS,
    MemoryRuns,
    StepRuns,
    memory_step_inputs,
    step_inputs,
)
from mha.service.core.scheduling import DirectScheduler, InferenceJob, PromptsApart

E = 64
ATOL = contract.PARITY_TOLERANCE["FP32"][0]


@pytest.fixture(scope="module")
def step_session(exported: Callable[..., Path]) -> ort.InferenceSession:
    folder = exported(target="ort", kv_cache=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


def run(session: ort.InferenceSession):  # type: ignore[no-untyped-def]
    def runner(feeds, outputs):  # type: ignore[no-untyped-def]
        return dict(zip(outputs, session.run(list(outputs), dict(feeds)), strict=True))

    return runner


def cache_of(session: ort.InferenceSession, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The projected K/V of a whole prefix, from one step over it from an empty cache."""
    empty = np.zeros((1, 0, E), np.float32)
    outputs = run(session)(step_inputs(tokens, empty, empty), STEP_OUTPUTS)
    return outputs[contract.NEW_KEY], outputs[contract.NEW_VALUE]


sequences = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 4)),  # (P, T) of each sequence's step
    min_size=1, max_size=6,
)  # fmt: skip


@given(plan=sequences, seed=st.integers(0, 2**16))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_batched_steps_equal_each_step_alone(step_session, plan, seed) -> None:
    rng = np.random.default_rng(seed)
    jobs = []
    for i, (past, new) in enumerate(plan):
        prefix = rng.standard_normal((1, past, E)).astype(np.float32)
        keys, values = cache_of(step_session, prefix) if past else (prefix, prefix)
        query = rng.standard_normal((1, new, E)).astype(np.float32)
        jobs.append(InferenceJob(f"s{i}", step_inputs(query, keys, values), STEP_OUTPUTS))
    runner = CountingRunner(run(step_session))
    # A delay: the first job waits for company instead of running alone at once.
    options = BatchingOptions(
        max_batch_size=32, policy="fifo", max_padding_fraction=1.0, max_queue_delay_us=1000
    )
    scheduler = BatchingScheduler(runner, options, self_attention=True, runs=StepRuns())

    async def all_at_once() -> list:
        try:
            return await asyncio.gather(*(scheduler.submit(job) for job in jobs))
        finally:
            await scheduler.close()

    results = asyncio.run(all_at_once())
    # They all queued before the first run: one session call for the one-token steps, one
    # for the others (StepRuns.key keeps them apart).
    assert runner.calls == len({new == 1 for _, new in plan})
    for job, result in zip(jobs, results, strict=True):
        alone = run(step_session)(job.inputs, STEP_OUTPUTS)
        for name in STEP_OUTPUTS:
            assert result.outputs[name].shape == alone[name].shape, (job.request_id, name)
            np.testing.assert_allclose(result.outputs[name], alone[name], rtol=0, atol=ATOL,
                                       err_msg=f"{job.request_id} {name}")  # fmt: skip


def test_padding_fraction_counts_padded_context_slots() -> None:
    runs = StepRuns()
    jobs = [step_inputs(np.zeros((1, t, E), np.float32), np.zeros((1, p, E), np.float32),
                        np.zeros((1, p, E), np.float32)) for p, t in ((6, 1), (2, 3))]  # fmt: skip
    merged = runs.merge(jobs)
    assert merged.feeds[contract.KEY_PADDING_MASK].tolist() == [
        [False] * 6 + [False, True, True],
        [False, False] + [True] * 4 + [False, False, False],
    ]
    # slots: 2 x (6 + 3) = 18, real: 7 + 5 = 12
    assert runs.fraction([runs.shape(j) for j in jobs]) == pytest.approx(6 / 18)


def test_a_step_runs_while_a_prompt_chunk_is_held(step_session) -> None:
    """Offloaded jobs (a prompt's chunks) never hold the steps' run slot (PromptsApart)."""
    entered, gate = threading.Event(), threading.Event()
    real = run(step_session)

    def runner(feeds, outputs):  # type: ignore[no-untyped-def]
        if feeds[contract.QUERY].shape[1] > 1:  # the chunk waits for the gate
            entered.set()
            assert gate.wait(timeout=30), "the gate stayed shut"
        return real(feeds, outputs)

    steps = BatchingScheduler(
        runner, BatchingOptions(policy="fifo"), self_attention=True, runs=StepRuns()
    )
    scheduler = PromptsApart(steps, DirectScheduler(runner))
    past = np.ones((1, 4, E), np.float32)
    chunk = step_inputs(np.ones((1, 8, E), np.float32), past, past)
    step = step_inputs(np.ones((1, 1, E), np.float32), past, past)

    async def step_beside_a_held_chunk() -> None:
        held = asyncio.create_task(
            scheduler.submit(InferenceJob("chunk", chunk, STEP_OUTPUTS, offload=True))
        )
        await asyncio.to_thread(entered.wait, 30)
        await scheduler.submit(InferenceJob("step", step, STEP_OUTPUTS))
        assert not held.done()  # the step ran while the chunk was still held
        gate.set()
        await held
        await scheduler.close()

    asyncio.run(step_beside_a_held_chunk())


def test_one_token_steps_never_share_a_run_with_a_prompt_chunk() -> None:
    """A chunk of T rows would pad every one-token step of its run to T rows."""
    runs = StepRuns()
    past = np.zeros((1, 5, E), np.float32)
    keys = [
        runs.key(step_inputs(np.zeros((1, t, E), np.float32), past, past), STEP_OUTPUTS)
        for t in (1, 1, 4, 3)
    ]
    assert keys[0] == keys[1] != keys[2] == keys[3]


@pytest.fixture(scope="module")
def memory_step_session(exported: Callable[..., Path]) -> ort.InferenceSession:
    folder = exported(target="ort", kv_cache=True, self_attention=False, kdim=48, vdim=40)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


memories = st.lists(
    st.tuples(st.integers(1, 40), st.integers(0, 40), st.integers(1, 4)),  # (S, padded, T)
    min_size=1, max_size=6,
)  # fmt: skip


@given(plan=memories, seed=st.integers(0, 2**16))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_batched_memory_steps_equal_each_step_alone(memory_step_session, plan, seed) -> None:
    rng = np.random.default_rng(seed)
    jobs = []
    for i, (length, padded, new) in enumerate(plan):
        memory = [rng.standard_normal((1, length, E)).astype(np.float32) for _ in range(2)]
        mask = np.zeros((1, length), bool)
        mask[0, length - min(padded, length) :] = padded > 0
        query = rng.standard_normal((1, new, E)).astype(np.float32)
        inputs = memory_step_inputs(query, *memory, mask)
        jobs.append(InferenceJob(f"m{i}", inputs, MEMORY_OUTPUTS))
    runner = CountingRunner(run(memory_step_session))
    # A delay: the first job waits for company instead of running alone at once.
    options = BatchingOptions(
        max_batch_size=32, policy="fifo", max_padding_fraction=1.0, max_queue_delay_us=1000
    )
    scheduler = BatchingScheduler(runner, options, self_attention=True, runs=MemoryRuns())

    async def all_at_once() -> list:
        try:
            return await asyncio.gather(*(scheduler.submit(job) for job in jobs))
        finally:
            await scheduler.close()

    results = asyncio.run(all_at_once())
    assert runner.calls == len({new == 1 for _, _, new in plan})  # as for StepRuns
    for job, result in zip(jobs, results, strict=True):
        alone = run(memory_step_session)(job.inputs, MEMORY_OUTPUTS)
        np.testing.assert_allclose(result.outputs["output"], alone["output"], rtol=0, atol=ATOL,
                                   err_msg=job.request_id)  # fmt: skip
