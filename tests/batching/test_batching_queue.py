"""The queue around the runs: limits, deadlines, cancellation, failures, shutdown, metrics."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import numpy as np
import pytest
from batching_helpers import CountingRunner, Model, make_job

from mha.service.core.batching import BatchingOptions, BatchingScheduler
from mha.service.core.errors import DeadlineExceeded, QueueFull, Unavailable
from mha.service.core.metrics import Metrics
from mha.service.core.scheduling import InferenceJob

LABELS = ("m", "1")


@pytest.fixture
def model(models) -> Model:
    return models("self-fp32")


def scheduler_for(model: Model, runner: CountingRunner, metrics: Metrics | None = None, **options):
    options = {"max_queue_delay_us": 0, **options}
    return BatchingScheduler(
        runner,
        BatchingOptions(**options),
        self_attention=model.self_attention,
        metrics=metrics,
        labels=LABELS,
    )


def jobs(model: Model, count: int, B: int = 1, L: int = 8, seed: int = 0) -> list[InferenceJob]:
    rng = np.random.default_rng(seed)
    return [make_job(model, rng, B, L, L, request_id=f"j{i}") for i in range(count)]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": "m", "version": "1", **labels})
    return 0.0 if value is None else value


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until the condition holds (a generous cap on the iterations).

    Only the event loop is involved (tasks submitting and queueing), so this waits for
    other tasks to reach a state, never for time to pass.
    """
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


async def start_held_run(scheduler: BatchingScheduler, runner: CountingRunner, job) -> asyncio.Task:
    """Submit a job and wait until its run is in the runner, held there."""
    runner.hold()
    task = asyncio.create_task(scheduler.submit(job))
    await runner.entered()
    return task


def test_queue_full_refuses_at_once_and_queued_jobs_still_finish(model: Model) -> None:
    async def main() -> None:
        runner, metrics = CountingRunner(model.run), Metrics()
        scheduler = scheduler_for(model, runner, metrics, max_queue_size=2)
        first, *queued, extra = jobs(model, 4)
        running = await start_held_run(scheduler, runner, first)
        waiting = [asyncio.create_task(scheduler.submit(job)) for job in queued]
        await until(lambda: scheduler.queued == 2, "2 jobs queued")
        assert sample(metrics, "mha_queue_depth") == 2
        with pytest.raises(QueueFull, match=r"queue full \(2 requests waiting\)") as refused:
            await scheduler.submit(extra)
        assert refused.value.code.name == "UNAVAILABLE"
        runner.release()
        results = await asyncio.gather(running, *waiting)
        assert [r.batch_size for r in results] == [1, 2, 2]
        assert runner.samples == [1, 2]
        assert sample(metrics, "mha_queue_depth") == 0
        await scheduler.close()

    asyncio.run(main())


def test_deadline_passing_in_the_queue_fails_without_compute(model: Model) -> None:
    async def main() -> None:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner)
        first, late = jobs(model, 2)
        running = await start_held_run(scheduler, runner, first)
        late.deadline = time.monotonic() + 0.05
        with pytest.raises(DeadlineExceeded, match=r"expired in the queue after \d+\.\d ms"):
            await scheduler.submit(late)
        runner.release()
        await running
        await scheduler.close()
        assert runner.calls == 1 and runner.samples == [1]

    asyncio.run(main())


def test_deadline_already_passed_is_refused_without_compute(model: Model) -> None:
    async def main() -> None:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner)
        (job,) = jobs(model, 1)
        job.deadline = time.monotonic() - 1
        with pytest.raises(DeadlineExceeded, match="deadline"):
            await scheduler.submit(job)
        await scheduler.close()
        assert runner.calls == 0

    asyncio.run(main())


def test_cancelled_submit_leaves_the_queue(model: Model) -> None:
    async def main() -> None:
        runner, metrics = CountingRunner(model.run), Metrics()
        scheduler = scheduler_for(model, runner, metrics)
        first, gone, later = jobs(model, 3, B=2)
        running = await start_held_run(scheduler, runner, first)
        task = asyncio.create_task(scheduler.submit(gone))
        await until(lambda: scheduler.queued == 1, "the job queued")
        assert sample(metrics, "mha_queue_depth") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sample(metrics, "mha_queue_depth") == 0
        runner.release()
        await running
        result = await scheduler.submit(later)
        await scheduler.close()
        assert runner.samples == [2, 2]  # the cancelled job was never computed
        assert result.batch_size == 2

    asyncio.run(main())


def test_runner_failure_fails_its_batch_and_the_next_batch_works(model: Model) -> None:
    async def main() -> None:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner, max_queue_delay_us=50_000, policy="fifo")
        failing = jobs(model, 3, seed=1)
        runner.fail_next = RuntimeError("session run failed")
        results = await asyncio.gather(
            *(scheduler.submit(job) for job in failing), return_exceptions=True
        )
        assert runner.calls == 1
        assert all(isinstance(r, RuntimeError) for r in results)
        assert results[0] is results[1] is results[2]  # the same exception for the servicer
        after = await scheduler.submit(jobs(model, 1, seed=2)[0])
        await scheduler.close()
        assert after.outputs["output"].shape == (1, 8, model.config["d_model"])

    asyncio.run(main())


def test_close_finishes_accepted_jobs_and_refuses_new_ones(model: Model) -> None:
    async def main() -> None:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner, max_batch_size=2)
        first, *queued, refused = jobs(model, 5)
        running = await start_held_run(scheduler, runner, first)
        waiting = [asyncio.create_task(scheduler.submit(job)) for job in queued]
        await until(lambda: scheduler.queued == len(queued), "every job queued")
        closing = asyncio.create_task(scheduler.close())
        await until(lambda: scheduler.closing, "close() begun")
        with pytest.raises(Unavailable, match="shutting down"):
            await scheduler.submit(refused)
        runner.release()
        await closing
        assert all(t.done() for t in [running, *waiting])
        assert [len(r.outputs["output"]) for r in await asyncio.gather(running, *waiting)] == [
            1
        ] * 4
        assert runner.samples == [1, 2, 1]

    asyncio.run(main())


def test_jobs_arriving_during_a_run_form_the_next_batch(model: Model) -> None:
    async def main() -> None:
        runner, metrics = CountingRunner(model.run), Metrics()
        scheduler = scheduler_for(model, runner, metrics, max_batch_size=4)
        first, *queued = jobs(model, 8, B=1)
        running = await start_held_run(scheduler, runner, first)
        waiting = [asyncio.create_task(scheduler.submit(job)) for job in queued]
        await until(lambda: scheduler.queued == len(queued), "every job queued")
        runner.release()
        results = await asyncio.gather(running, *waiting)
        await scheduler.close()
        assert runner.samples == [1, 4, 3]  # never over max_batch_size, oldest first
        assert [r.batch_size for r in results] == [1, 4, 4, 4, 4, 3, 3, 3]
        assert all(r.queue_ns >= 0 and r.compute_ns > 0 for r in results)
        assert sample(metrics, "mha_batch_size_samples_count") == 3
        assert sample(metrics, "mha_batch_size_samples_sum") == 8
        assert sample(metrics, "mha_compute_duration_seconds_count") == 3

    asyncio.run(main())


def test_a_client_gone_mid_run_does_not_disturb_its_batch(model: Model) -> None:
    async def main() -> None:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner, max_queue_delay_us=50_000)
        gone, staying = jobs(model, 2)
        runner.hold()
        tasks = [asyncio.create_task(scheduler.submit(job)) for job in (gone, staying)]
        await runner.entered()
        tasks[0].cancel()
        runner.release()
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        result = await tasks[1]
        await scheduler.close()
        assert runner.samples == [2] and result.batch_size == 2
        np.testing.assert_allclose(
            result.outputs["output"], model.run(staying.inputs, ("output",))["output"], atol=1e-5
        )

    asyncio.run(main())


def test_only_jobs_asking_the_same_outputs_share_a_run(models) -> None:
    """attention_weights is computed only for the jobs that asked for it."""
    model = models("cross-fp32")
    rng = np.random.default_rng(5)
    plain = [make_job(model, rng, 1, 4, 6, request_id=f"p{i}") for i in range(2)]
    weighted = make_job(model, rng, 1, 4, 6, outputs=("output", "attention_weights"))

    async def main() -> list:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner, max_queue_delay_us=50_000, policy="fifo")
        results = await asyncio.gather(
            *(scheduler.submit(j) for j in [plain[0], weighted, plain[1]])
        )
        await scheduler.close()
        assert sorted(zip(runner.asked, runner.samples, strict=True)) == [
            (("output",), 2),
            (("output", "attention_weights"), 1),
        ]
        return results

    first, middle, last = asyncio.run(main())
    assert list(first.outputs) == list(last.outputs) == ["output"]
    assert list(middle.outputs) == ["output", "attention_weights"]


def test_a_job_larger_than_max_batch_size_runs_alone(model: Model) -> None:
    async def main() -> None:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner, max_batch_size=2, max_queue_delay_us=50_000)
        big, small = jobs(model, 1, B=5)[0], jobs(model, 1, B=1)[0]
        results = await asyncio.gather(scheduler.submit(big), scheduler.submit(small))
        await scheduler.close()
        assert runner.samples == [5, 1]
        assert [r.batch_size for r in results] == [5, 1]

    asyncio.run(main())


def test_two_runs_in_flight_when_allowed(model: Model) -> None:
    async def main() -> None:
        runner = CountingRunner(model.run)
        scheduler = scheduler_for(model, runner, max_in_flight=2)
        first, second = jobs(model, 2)
        running = await start_held_run(scheduler, runner, first)
        task = asyncio.create_task(scheduler.submit(second))
        await runner.entered()  # the second run started while the first is held
        runner.release()
        await asyncio.gather(running, task)
        await scheduler.close()
        assert runner.max_active == 2

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_queue_size", 0),
        ("max_in_flight", 0),
        ("max_queue_delay_us", -1),
        ("policy", "greedy"),
        ("max_padding_fraction", 1.5),
    ],
)
def test_options_name_the_bad_value(field: str, value: object) -> None:
    # Both the setting and the value it got must be named (in that order).
    with pytest.raises(ValueError, match=rf"{re.escape(field)}.*{re.escape(repr(value))}"):
        BatchingOptions(**{field: value})  # type: ignore[arg-type]
