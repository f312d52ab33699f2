"""Dynamic batching for attention models: many small ragged requests, one session run.

One BatchingScheduler serves one model version. A job that finds the queue empty and a run
slot free (and no batch delay configured) runs at once, alone, without the queue's hops: at
low load batching costs nothing. Otherwise submit() puts the job in a bounded queue and
awaits its answer; a background task (started by the first submit) forms a batch from
the oldest job plus compatible company that arrives within max_queue_delay_us, merges it
(mha.service.core.padding: right padding + key_padding_mask), runs the Runner once in the
executor, and hands each job exactly its own rows.

Policies (BatchingOptions.policy) decide who shares a run with the oldest queued job; the
oldest always goes, so no job starves:
  bucket  (default) company is taken from the oldest job's power-of-two length bucket
          first (L and S), nearest length first, then neighbouring buckets, while padded
          tokens / all tokens <= max_padding_fraction. Least waste per sample batched; a
          job of an odd length may wait a few runs longer than under fifo (until it is
          the oldest).
  cap     company is taken in arrival order, skipping a job that would push the padded
          fraction over max_padding_fraction. Closest to arrival order under the same
          bound; early arrivals of a dissimilar length can take the room of later
          similar ones.
  fifo    company is taken in arrival order up to max_batch_size, padding unbounded.
          Fullest batches and lowest queueing delay; on a length mix one long job makes
          the whole run pay for its length (~45% padded tokens on L uniform in [16, 256]).
max_padding_fraction trades batch size against wasted compute: 0 merges only equal
lengths, 1 admits any padding. Simulated on queues of 32 jobs with L uniform in [16, 256],
bucket forms runs of ~2.4 / 3.7 / 8.3 samples on average at caps 0.05 / 0.1 / 0.25.
Per device: where a run's cost per sample barely falls with the batch size (ONNX Runtime
on CPU, already near the matrix-multiply peak at B=1) padding is pure loss and a low cap
(e.g. 0.05) suits it; where it falls steeply (a GPU, which small batches leave
idle), padding is cheap and 0.25 or more pays. The queue delay trades latency at low load
(a lone job waits up to the delay for company) against batch size; at high load the queue
fills while a run is in flight and the delay no longer matters. The default, 0, never waits:
a batch is whatever queued while the previous run was busy, so one client sees no delay
(measured on 2 CPU cores: 500 us, which asyncio rounds up to ~1.7 ms, cost one client
+1.3 ms p50 at (1,16) and bought nothing under load).

Whether to merge at all is measured, not assumed (scheduling.MergeGain): while merged runs
cost no less per input element than runs of one job, the oldest queued job runs alone.

Runs in flight: max_in_flight (default 1). On CPU one run already spreads over every core
through ONNX Runtime's intra-op threads, so a second concurrent run mostly contends; jobs
arriving meanwhile queue up and form the next, larger batch. On a GPU, 2 lets the host
merge and copy the next batch while the device computes the current one (with IO binding
the copies go on the session's stream), which hides the host work.

asyncio's timers have ~1 ms granularity (epoll), so delays under 1 ms round up to ~1 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from mha.service.core import padding
from mha.service.core.errors import DeadlineExceeded, QueueFull, Unavailable
from mha.service.core.metrics import Metrics
from mha.service.core.scheduling import (
    InferenceJob,
    JobResult,
    MergeGain,
    Runner,
    RunPlace,
    elements,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingOptions:
    """How a model version's jobs are batched; see the module docstring for the policies."""

    max_batch_size: int = 32  # samples per session run (also <= model max_batch_size)
    max_queue_delay_us: int = 0  # how long the first job of a batch may wait for company
    max_queue_size: int = 256  # jobs waiting per model version; beyond: QueueFull
    policy: str = "bucket"
    max_padding_fraction: float = 0.25  # padded tokens / all tokens allowed in one run
    max_in_flight: int = 1  # session runs at once per model version (2 pays off on a GPU)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.policy not in padding.POLICIES:
            raise ValueError(
                f"unknown batch policy {self.policy!r}; choose from {', '.join(padding.POLICIES)}"
            )
        if not 0.0 <= self.max_padding_fraction <= 1.0:
            raise ValueError(
                f"max_padding_fraction must be in [0, 1], got {self.max_padding_fraction}"
            )


@dataclass(eq=False)
class _Pending:
    """A queued job and the future its submit() awaits."""

    job: InferenceJob
    future: asyncio.Future[JobResult]
    shape: padding.Shape
    key: tuple
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Run:
    """What one session run produced, measured in the executor thread."""

    answers: list[dict[str, np.ndarray]]
    start: float
    end: float
    padding_fraction: float
    spent: float = 0.0  # seconds with the merge and the split (MergeGain's figure)


class BatchingScheduler:
    """Merge compatible queued jobs of one model version into one session run."""

    def __init__(
        self,
        runner: Runner,
        options: BatchingOptions,
        *,
        self_attention: bool,
        metrics: Metrics | None = None,
        labels: tuple[str, str] = ("", ""),
        executor: Executor | None = None,
        runs: padding.RunShaper | None = None,
        inline_under_s: float = 0.0,
    ) -> None:
        self._runner = runner
        self._place = RunPlace(runner, inline_under_s)
        self.gain = MergeGain()  # whether merged runs pay here (runs' own measurements)
        self._options = options
        self._self_attention = self_attention
        self._runs: padding.RunShaper = runs or padding.AttentionRuns(self_attention)
        self._metrics = metrics
        self._labels = labels
        self._executor = executor
        self._queue: dict[int, _Pending] = {}  # arrival order (dicts keep insertion order)
        self._seq = 0
        self._closing = False
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        """Jobs waiting for a run."""
        return len(self._queue)

    @property
    def closing(self) -> bool:
        """close() has begun: new jobs are refused."""
        return self._closing

    async def submit(self, job: InferenceJob) -> JobResult:
        """Queue the job and return its own answer from a shared run."""
        if self._closing:
            raise Unavailable(f"request {job.request_id!r}: model is shutting down")
        if len(self._queue) >= self._options.max_queue_size:
            raise QueueFull(
                f"request {job.request_id!r}: queue full "
                f"({self._options.max_queue_size} requests waiting); retry later"
            )
        if job.expired():
            raise DeadlineExceeded(
                f"request {job.request_id!r}: deadline passed before it was queued"
            )
        self._start()
        if self._can_run_alone():
            return await self._run_alone(job)
        loop = asyncio.get_running_loop()
        pending = _Pending(
            job,
            loop.create_future(),
            self._runs.shape(job.inputs),
            self._runs.key(job.inputs, job.outputs),
        )
        seq = self._seq
        self._seq += 1
        self._queue[seq] = pending
        self._queue_changed()
        try:
            return await self._await(seq, pending)
        finally:
            # Cancelled (client gone) or timed out while still queued: leave the queue.
            if self._queue.pop(seq, None) is not None:
                self._queue_changed()

    def _can_run_alone(self) -> bool:
        """Nothing queued, a run slot free, no delay to wait for company: the job runs at
        once, without the queue's hops (three task switches and an event). Batches still form
        under load: whatever arrives while a run holds the slot queues for the next run."""
        slots = self._slots
        return (
            not self._queue
            and self._options.max_queue_delay_us == 0
            and slots is not None
            and not slots.locked()
        )

    async def _run_alone(self, job: InferenceJob) -> JobResult:
        slots = self._slots
        assert slots is not None
        await slots.acquire()  # free (checked): returns at once
        work = elements((job,))
        inline = not job.offload and self._place.inline(work)
        if inline:
            try:
                run = self._compute((job,))
            finally:
                slots.release()
        else:
            pending = asyncio.get_running_loop().run_in_executor(
                self._executor, self._compute, (job,)
            )
            # The slot is held until the run ends, even if the client goes away meanwhile.
            pending.add_done_callback(lambda _: slots.release())
            run = await asyncio.shield(pending)
        if not job.offload:
            self._place.ran(run.end - run.start, work)
        self.gain.ran(run.end - run.start, work, 1)
        if self._metrics is not None:
            self._metrics.batch_run(
                *self._labels, run.end - run.start, job.batch_size, 0.0, inline=inline
            )
        return JobResult(
            outputs=run.answers[0],
            queue_ns=int((run.start - job.enqueued) * 1e9),
            compute_ns=int((run.end - run.start) * 1e9),
            batch_size=job.batch_size,
        )

    async def _await(self, seq: int, pending: _Pending) -> JobResult:
        """The job's result; DeadlineExceeded if its deadline passes while still queued."""
        deadline = pending.job.deadline
        if deadline is None:
            return await pending.future
        await asyncio.wait({pending.future}, timeout=max(0.0, deadline - time.monotonic()))
        if not pending.future.done() and seq in self._queue:
            raise _expired(pending)
        return await pending.future  # already running: compute has started, let it finish

    async def close(self) -> None:
        """Refuse new jobs, run every accepted one, then stop the background task."""
        self._closing = True
        if self._worker is None:
            return
        assert self._wake is not None
        self._wake.set()
        await asyncio.gather(self._worker, return_exceptions=True)  # _log_death logged it
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        assert self._slots is not None
        for _ in range(self._options.max_in_flight):  # runs of jobs that ran alone
            await self._slots.acquire()

    def _start(self) -> None:
        """Start the background task in the running loop, once (again if it died)."""
        if self._worker is not None and not self._worker.done():
            return
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._options.max_in_flight)
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self._worker.add_done_callback(_log_death)

    def _queue_changed(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._metrics is not None:
            self._metrics.child(self._metrics.queue_depth, *self._labels).set(len(self._queue))

    async def _loop(self) -> None:
        """Form batches while a run slot is free, until closed and drained.

        It waits for queued work without holding a slot (so a lone job can run alone),
        then takes a slot and forms the batch from everything queued by then."""
        assert self._slots is not None and self._wake is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            batch = await self._next_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending]:
        """Wait for the oldest job's delay (or a full batch) and take its batch off the queue."""
        assert self._wake is not None
        while True:
            self._drop_expired()
            if not self._queue:
                return []
            oldest = next(iter(self._queue.values()))
            ready_at = oldest.arrived + self._options.max_queue_delay_us * 1e-6
            company = self._compatible(oldest)
            samples = sum(p.shape.B for p in company.values())
            wait = ready_at - time.monotonic()
            if self._closing or wait <= 0 or samples >= self._options.max_batch_size:
                return self._take(company)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _compatible(self, oldest: _Pending) -> dict[int, _Pending]:
        return {seq: p for seq, p in self._queue.items() if p.key == oldest.key}

    def _take(self, company: dict[int, _Pending]) -> list[_Pending]:
        """Remove the policy's choice among the compatible jobs from the queue."""
        seqs = list(company)
        o = self._options
        chosen = padding.select(
            [company[s].shape for s in seqs],
            o.policy,
            o.max_batch_size,
            o.max_padding_fraction,
            self._self_attention,
        )
        if len(chosen) > 1 and not self.gain.merge():
            chosen = [0]  # merging does not pay here: the oldest runs alone, the rest wait
        batch = [self._queue.pop(seqs[i]) for i in chosen]
        self._queue_changed()
        return batch

    def _drop_expired(self) -> None:
        """Fail queued jobs whose deadline passed, without compute."""
        now = time.monotonic()
        expired = [seq for seq, p in self._queue.items() if p.job.expired(now)]
        for seq in expired:
            pending = self._queue.pop(seq)
            if not pending.future.done():
                pending.future.set_exception(_expired(pending))
        if expired:
            self._queue_changed()

    async def _run(self, batch: list[_Pending]) -> None:
        """Run one batch in the executor and settle every job's future; free the slot."""
        slots = self._slots  # the one this run holds, even if the task is restarted
        assert slots is not None
        try:
            loop = asyncio.get_running_loop()
            jobs = [p.job for p in batch]
            work = elements(jobs)
            offload = any(j.offload for j in jobs)
            inline = not offload and self._place.inline(work)
            if inline:
                run = self._compute(jobs)
            else:
                run = await loop.run_in_executor(self._executor, self._compute, jobs)
            if not offload:
                self._place.ran(run.end - run.start, work)
            self.gain.ran(run.spent, work, len(jobs))
        except Exception as error:  # the runner's failure is every job's failure
            log.debug("batch of %d jobs failed: %r", len(batch), error)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            slots.release()
        samples = sum(p.shape.B for p in batch)
        if self._metrics is not None:
            self._metrics.batch_run(
                *self._labels, run.end - run.start, samples, run.padding_fraction, inline=inline
            )
        for pending, answer in zip(batch, run.answers, strict=True):
            if not pending.future.done():  # done = cancelled by a client that went away
                pending.future.set_result(
                    JobResult(
                        outputs=answer,
                        queue_ns=int((run.start - pending.job.enqueued) * 1e9),
                        compute_ns=int((run.end - run.start) * 1e9),
                        batch_size=samples,
                    )
                )

    def _compute(self, jobs: Sequence[InferenceJob]) -> _Run:
        """Merge, run and split, in an executor thread (merge copies are off the loop too)."""
        if len(jobs) == 1:  # nothing to merge: the job's own tensors go straight in
            start = time.monotonic()
            outputs = self._runner(jobs[0].inputs, jobs[0].outputs)
            end = time.monotonic()
            return _Run([{n: outputs[n] for n in jobs[0].outputs}], start, end, 0.0, end - start)
        runs = self._runs
        began = time.monotonic()
        merged = runs.merge([j.inputs for j in jobs])
        try:
            start = time.monotonic()
            outputs = self._runner(merged.feeds, jobs[0].outputs)
            end = time.monotonic()
            answers = runs.split(
                outputs, [j.inputs for j in jobs], [j.outputs for j in jobs], merged.spans
            )
        finally:
            runs.release(merged)
        fraction = runs.fraction([runs.shape(j.inputs) for j in jobs])
        return _Run(answers, start, end, fraction, time.monotonic() - began)


def _expired(pending: _Pending) -> DeadlineExceeded:
    waited_ms = (time.monotonic() - pending.arrived) * 1e3
    return DeadlineExceeded(
        f"request {pending.job.request_id!r}: deadline expired in the queue after "
        f"{waited_ms:.1f} ms, before compute started"
    )


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("batching task stopped", exc_info=task.exception())
