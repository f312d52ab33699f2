"""Merging queued jobs only while merged runs measure cheaper per element (MergeGain)."""

from __future__ import annotations

import numpy as np
from batching_helpers import CountingRunner, answers_behind_a_held_run, make_job

from mha.service.core.batching import BatchingOptions, BatchingScheduler
from mha.service.core.scheduling import MergeGain


def test_merges_until_both_kinds_of_run_are_measured() -> None:
    gain = MergeGain()
    assert gain.pays()
    gain.ran(1.0, 1_000, jobs=1)
    assert gain.pays()  # no merged run measured yet
    gain.ran(4.0, 2_000, jobs=3)
    assert gain.alone == 1e-3 and gain.merged == 2e-3 and not gain.pays()


def with_figures(alone: float, merged: float) -> MergeGain:
    gain = MergeGain()
    gain.ran(alone * 1_000, 1_000, jobs=1)
    gain.ran(merged * 1_000, 1_000, jobs=4)
    return gain


def test_follows_what_pays_and_explores_the_other_way_now_and_then() -> None:
    gain = with_figures(alone=1e-3, merged=0.5e-3)  # half the cost per element: merge
    decisions = [gain.merge() for _ in range(3 * MergeGain.EXPLORE)]
    assert decisions.count(False) == 3 and not decisions[MergeGain.EXPLORE - 1]
    gain = with_figures(alone=1e-3, merged=1e-3)  # no gain: alone, one in EXPLORE merges
    decisions = [gain.merge() for _ in range(3 * MergeGain.EXPLORE)]
    assert decisions.count(True) == 3 and decisions[MergeGain.EXPLORE - 1]
    assert not with_figures(alone=1e-3, merged=0.95e-3).pays()  # within the margin


def test_only_the_latest_runs_count() -> None:
    gain = MergeGain()
    for _ in range(MergeGain.WINDOW):
        gain.ran(5.0, 1_000, jobs=1)
    for _ in range(MergeGain.WINDOW // 2 + 1):
        gain.ran(1.0, 1_000, jobs=1)
    assert gain.alone == 1e-3  # the majority of the window is the new cost


def test_one_cold_run_does_not_decide() -> None:
    """The figures are medians of the latest runs: one slow lone run (a cold first one, or
    one disturbed by the machine) is outvoted."""
    gain = MergeGain()
    gain.ran(50.0, 1_000, jobs=1)  # cold: 50 ms an element
    for _ in range(2):
        gain.ran(1.0, 1_000, jobs=1)
    gain.ran(2.0, 1_000, jobs=4)
    assert gain.alone == 1e-3 and not gain.pays()


def test_a_stale_figure_is_refreshed_by_exploring() -> None:
    """Under steady load every run merges; the exploring lone runs keep `alone` current."""
    gain = MergeGain()
    gain.ran(10.0, 1_000, jobs=1)  # a slow lone run, then only merged ones
    for _ in range(20 * MergeGain.EXPLORE):
        if gain.merge():
            gain.ran(2.0, 1_000, jobs=4)  # merged: 2 ms an element
        else:
            gain.ran(1.0, 1_000, jobs=1)  # alone, now warm: 1 ms an element
    assert not gain.pays()  # the lone runs measured cheaper once refreshed


def run_queued(models, merge_pays: bool) -> list[int]:
    """Samples of each run when 24 jobs queue behind a held run, the gain's figures fixed."""
    model = models("self-fp32")
    rng = np.random.default_rng(3)
    jobs = [make_job(model, rng, 1, 16, 16, request_id=f"j{i}") for i in range(25)]
    runner = CountingRunner(model.run)
    options = BatchingOptions(max_batch_size=8, max_queue_delay_us=0, max_padding_fraction=0)
    scheduler = BatchingScheduler(runner, options, self_attention=True)
    scheduler.gain.ran(1e-3, 1_000, jobs=1)
    scheduler.gain.ran(0.5e-3 if merge_pays else 2e-3, 1_000, jobs=2)
    scheduler.gain.ran = lambda *_: None  # type: ignore[method-assign]  # figures stay put

    results = answers_behind_a_held_run(scheduler, runner, jobs)
    for job, result in zip(jobs, results, strict=True):
        alone = model.run(job.inputs, job.outputs)["output"]
        np.testing.assert_allclose(result.outputs["output"], alone, atol=1e-5, rtol=0)
    return runner.samples


def test_queued_jobs_run_alone_when_merging_does_not_pay(models) -> None:
    samples = run_queued(models, merge_pays=False)
    assert sum(samples) == 25
    merged = [s for s in samples if s > 1]
    # Only the exploring decisions merge (one in EXPLORE); merging every time would be
    # the held run then runs of 8, 8 and 8.
    assert len(merged) <= 24 // MergeGain.EXPLORE + 1
    assert samples.count(1) >= 25 - 8 * len(merged)


def test_queued_jobs_merge_when_it_pays(models) -> None:
    samples = run_queued(models, merge_pays=True)
    assert sum(samples) == 25 and len(samples) <= 1 + 3 + 1  # the held run, then runs of 8
