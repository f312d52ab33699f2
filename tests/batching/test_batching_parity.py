"""Each batched answer equals the same job run alone: property test over random job mixes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from batching_helpers import KINDS, CountingRunner, Model, make_job
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mha.export.options import RTOL, TOLERANCE
from mha.service.core.batching import BatchingOptions, BatchingScheduler
from mha.service.core.padding import POLICIES
from mha.service.core.scheduling import InferenceJob


def tolerance(model: Model) -> dict[str, float]:
    """The export's own tolerance for the model's dtype (fp32: atol 1e-5, rtol 0)."""
    dtype = model.config["dtype"].lower()
    return {"atol": TOLERANCE[dtype], "rtol": RTOL[dtype]}


def assert_same_as_alone(model: Model, job: InferenceJob, got: dict[str, np.ndarray]) -> None:
    """The batched answer has the alone answer's names, shapes, dtypes and values."""
    alone = model.run(job.inputs, job.outputs)
    assert list(got) == list(job.outputs)
    for name in job.outputs:
        assert got[name].shape == alone[name].shape, (job.request_id, name)
        assert got[name].dtype == alone[name].dtype, (job.request_id, name)
        np.testing.assert_allclose(
            got[name].astype(np.float64),
            alone[name].astype(np.float64),
            **tolerance(model),
            err_msg=f"{job.request_id} {name}",
        )


async def serve_all(
    model: Model, jobs: list[InferenceJob], options: BatchingOptions, runner: CountingRunner
) -> list:
    """Submit every job at once (they queue before the first batch forms); all results."""
    scheduler = BatchingScheduler(runner, options, self_attention=model.self_attention)
    try:
        return await asyncio.gather(*(scheduler.submit(job) for job in jobs))
    finally:
        await scheduler.close()


@st.composite
def job_specs(draw: st.DrawFn, model: Model, outputs: tuple[str, ...] | None) -> dict:
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 40))
    S = L if model.self_attention else draw(st.integers(1, 40))
    samples = st.lists(st.integers(0, B - 1), max_size=B, unique=True)
    return {
        "B": B,
        "L": L,
        "S": S,
        "padded": draw(samples),
        "fully_padded": draw(samples),
        "outputs": outputs or draw(st.sampled_from(model.output_sets)),
    }


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # same examples every run: a failure here is a bug, not bad luck
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_batched_answers_equal_alone(models, data: st.DataObject) -> None:
    model = models(data.draw(st.sampled_from(sorted(KINDS)), label="kind"))
    # Mostly one outputs set for all (they can merge); sometimes each its own (they must not).
    outputs = data.draw(st.sampled_from([*model.output_sets, None]), label="outputs")
    specs = data.draw(st.lists(job_specs(model, outputs), min_size=2, max_size=8), label="jobs")
    options = BatchingOptions(
        max_batch_size=data.draw(st.integers(1, 12), label="max_batch_size"),
        max_queue_delay_us=5_000,
        policy=data.draw(st.sampled_from(POLICIES), label="policy"),
        max_padding_fraction=data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.0]), label="cap"),
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    jobs = [make_job(model, rng, request_id=f"j{i}", **s) for i, s in enumerate(specs)]
    runner = CountingRunner(model.run)
    results = asyncio.run(serve_all(model, jobs, options, runner))
    for job, result in zip(jobs, results, strict=True):
        assert_same_as_alone(model, job, result.outputs)
        assert job.batch_size <= result.batch_size
    assert sum(runner.samples) == sum(job.batch_size for job in jobs)
    event("merged" if runner.calls < len(jobs) else "each alone")  # --hypothesis-show-statistics


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mixed_lengths_share_one_run(models, kind: str) -> None:
    """With fifo and room for all, a length mix goes in one run and still matches alone."""
    model = models(kind)
    rng = np.random.default_rng(7)
    lengths = [
        (1, 3, 3 if model.self_attention else 9),
        (2, 17, 17),
        (3, 40, 40 if model.self_attention else 2),
    ]
    jobs = [
        make_job(model, rng, B, L, S, padded=[0], outputs=model.output_sets[-1], request_id=f"j{i}")
        for i, (B, L, S) in enumerate(lengths)
    ]
    runner = CountingRunner(model.run)
    options = BatchingOptions(max_queue_delay_us=50_000, policy="fifo")
    results = asyncio.run(serve_all(model, jobs, options, runner))
    assert runner.calls == 1 and runner.samples == [6]
    assert runner.widths == [(40, 40 if model.self_attention else 17)]
    for job, result in zip(jobs, results, strict=True):
        assert result.batch_size == 6
        assert_same_as_alone(model, job, result.outputs)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fully_padded_sample_gets_zero_rows(models, kind: str) -> None:
    """A sample whose own mask pads every key answers zeros, also when batched with others."""
    model = models(kind)
    rng = np.random.default_rng(3)
    S = 5
    lonely = make_job(model, rng, 3, 5, S, fully_padded=[1], outputs=model.output_sets[-1])
    company = make_job(model, rng, 2, 11, 11, outputs=model.output_sets[-1], request_id="company")
    runner = CountingRunner(model.run)
    options = BatchingOptions(max_queue_delay_us=50_000, policy="fifo")
    result, _ = asyncio.run(serve_all(model, [lonely, company], options, runner))
    assert runner.calls == 1
    assert result.outputs["output"].shape == (3, 5, model.config["d_model"])
    assert not result.outputs["output"][1].any()
    assert result.outputs["output"][0].any() and result.outputs["output"][2].any()
    if "attention_weights" in result.outputs:
        weights = result.outputs["attention_weights"]
        assert weights.shape == (3, model.config["num_heads"], 5, S)
        assert not weights[1].any()
    assert_same_as_alone(model, lonely, result.outputs)
