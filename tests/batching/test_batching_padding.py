"""Padding policies bound the waste; the merge marks exactly the padding in the mask."""

from __future__ import annotations

import numpy as np
import pytest
from batching_helpers import CountingRunner, answers_behind_a_held_run, make_job
from hypothesis import given, settings
from hypothesis import strategies as st

from mha.service.core.batching import BatchingOptions, BatchingScheduler
from mha.service.core.metrics import Metrics
from mha.service.core.padding import POLICIES, Shape, merge, padding_fraction, select

shapes_st = st.lists(
    st.builds(Shape, st.integers(1, 4), st.integers(1, 300), st.integers(1, 300)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    shapes=shapes_st,
    policy=st.sampled_from(POLICIES),
    max_samples=st.integers(1, 32),
    cap=st.floats(0.0, 1.0),
    self_attention=st.booleans(),
)
def test_select_keeps_the_oldest_and_the_limits(
    shapes, policy, max_samples, cap, self_attention
) -> None:
    if self_attention:
        shapes = [Shape(s.B, s.L, s.L) for s in shapes]
    chosen = select(shapes, policy, max_samples, cap, self_attention)
    assert chosen[0] == 0 and chosen == sorted(set(chosen))
    taken = [shapes[i] for i in chosen]
    if len(taken) > 1:
        assert sum(s.B for s in taken) <= max_samples
        if policy != "fifo":
            assert padding_fraction(taken, self_attention) <= cap
    if policy == "fifo":  # arrival order while the samples fit
        fits = 0
        for s in shapes[1:]:
            if shapes[0].B + sum(shapes[i].B for i in range(1, fits + 1)) + s.B > max_samples:
                break
            fits += 1
        assert chosen[: fits + 1] == list(range(fits + 1))


def test_policies_pick_by_their_own_order() -> None:
    # 33 is in the next power-of-two bucket: cap takes it (arrival order, 20% padding),
    # bucket takes the two same-bucket jobs first, fifo takes arrival order regardless.
    shapes = [Shape(1, n, n) for n in (20, 33, 21, 22)]
    assert select(shapes, "bucket", 3, 0.25, True) == [0, 2, 3]
    assert select(shapes, "cap", 3, 0.25, True) == [0, 1, 3]
    assert select(shapes, "fifo", 3, 0.25, True) == [0, 1, 2]
    assert select(shapes, "bucket", 3, 0.0, True) == [0]  # no padding allowed at all


def test_padding_fraction_counts_tokens() -> None:
    # self: samples of 2 and 4 tokens padded to 4: 2 padded of 8
    assert padding_fraction([Shape(1, 2, 2), Shape(1, 4, 4)], True) == pytest.approx(2 / 8)
    # cross: query and key tokens both count: (2+8) and (4+2) padded to (4+8): 8 of 24
    assert padding_fraction([Shape(1, 2, 8), Shape(1, 4, 2)], False) == pytest.approx(8 / 24)


def test_merge_marks_padding_and_keeps_each_jobs_mask() -> None:
    rng = np.random.default_rng(0)

    def job(B: int, L: int, S: int, mask: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "query": rng.standard_normal((B, L, 4)),
            "key": rng.standard_normal((B, S, 5)),
            "value": rng.standard_normal((B, S, 6)),
            "key_padding_mask": mask,
        }

    a = job(1, 2, 3, np.array([[False, True, False]]))
    b = job(2, 4, 1, np.zeros((2, 1), bool))
    merged = merge([a, b])
    assert merged.spans == [(0, 1), (1, 3)] and (merged.max_l, merged.max_s) == (4, 3)
    f = merged.feeds
    assert f["query"].shape == (3, 4, 4) and f["key"].shape == (3, 3, 5)
    assert f["value"].shape == (3, 3, 6)
    np.testing.assert_array_equal(
        f["key_padding_mask"], [[False, True, False], [False, True, True], [False, True, True]]
    )
    np.testing.assert_array_equal(f["query"][0, :2], a["query"][0])
    assert not f["query"][0, 2:].any() and not f["key"][1:, 1:].any()


def test_length_mix_stays_within_the_padding_cap(models) -> None:
    """40 jobs, L uniform in [16, 256], queued behind a held run: every run within the cap."""
    model = models("self-fp32")
    rng = np.random.default_rng(11)
    lengths = rng.integers(16, 257, size=41)
    jobs = [
        make_job(model, rng, 1, int(n), int(n), request_id=f"j{i}") for i, n in enumerate(lengths)
    ]
    runner, metrics = CountingRunner(model.run), Metrics()
    options = BatchingOptions(max_batch_size=8, max_queue_delay_us=0, max_padding_fraction=0.25)
    scheduler = BatchingScheduler(
        runner, options, self_attention=True, metrics=metrics, labels=("m", "1")
    )

    results = answers_behind_a_held_run(scheduler, runner, jobs)
    # These jobs pad nothing themselves, so a run's masked fraction is its padding fraction.
    assert max(runner.masked) <= 0.25
    assert max(runner.samples) <= 8 and sum(runner.samples) == 41
    assert len(runner.samples) < 41  # it did batch
    labels = {"model": "m", "version": "1"}
    runs = metrics.registry.get_sample_value("mha_batch_padding_fraction_count", labels)
    within = metrics.registry.get_sample_value(
        "mha_batch_padding_fraction_bucket", {**labels, "le": "0.25"}
    )
    assert runs == within == len(runner.samples)
    for job, result in zip(jobs, results, strict=True):
        alone = model.run(job.inputs, job.outputs)["output"]
        np.testing.assert_allclose(result.outputs["output"], alone, atol=1e-5, rtol=0)
