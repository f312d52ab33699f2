"""What the servicer hands to a model's scheduler, and the scheduler without batching.

The servicer decodes and validates a request into an InferenceJob (numpy arrays in the
model's dtype, limits already checked) and awaits `scheduler.submit(job)`. A scheduler runs
jobs through a blocking `Runner` (ONNX Runtime's session.run behind a small wrapper) off the
event loop. DirectScheduler runs each job alone; mha.service.core.batching.BatchingScheduler
merges compatible jobs into one run. Both honour deadlines and cancellation.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mha.service.core.errors import DeadlineExceeded
from mha.service.core.metrics import Metrics

# Blocking: feeds by graph input name -> outputs by name, in the order asked. Thread-safe
# (ONNX Runtime allows concurrent run() calls on one session).
Runner = Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


@dataclass
class InferenceJob:
    """One validated request for one model version.

    inputs always holds every graph input: query [B, L, E]; key [B, S, kdim] and
    value [B, S, vdim] for cross-attention models; key_padding_mask [B, S] bool,
    True = padding (all False when the request omitted it).
    """

    request_id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    deadline: float | None = None  # time.monotonic() seconds; None = no deadline
    enqueued: float = field(default_factory=time.monotonic)
    # Run in the executor whatever its expected time, and leave RunPlace's figure alone: a
    # prompt's chunk, so the loop keeps serving other sequences' steps while it runs (run
    # on the loop, a prompt's chunks would follow one another with nothing between them).
    offload: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.inputs["query"].shape[0])

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline


@dataclass
class JobResult:
    outputs: dict[str, np.ndarray]
    queue_ns: int  # from submit to the start of the session run
    compute_ns: int  # the session run that served it (shared when batched)
    batch_size: int  # samples in that session run (>= the job's own B when batched)


def runs_inline(runner: Runner) -> bool:
    """A runner marked `inline` (the --no-compute zeros) is called on the event loop: it
    costs less than the thread hop (~50-100 us) that would carry it to the executor."""
    return bool(getattr(runner, "inline", False))


def elements(jobs: Sequence[InferenceJob]) -> int:
    """Input elements of the jobs: the work a run of them does (RunPlace's unit)."""
    return sum(a.size for job in jobs for a in job.inputs.values())


class RunPlace:
    """Where one model's session runs go: the event loop or the executor.

    A thread hop to the executor and back costs ~50-100 us here (a queue put, a wakeup, a
    future and the loop's self-pipe), and every executor thread grows its own malloc arena.
    A run expected to take under `inline_under_s` (its input elements at the model's
    measured seconds per element) runs on the event loop itself, which waits for it (ONNX
    Runtime's intra-op threads still spread it over the cores); a longer one goes to the
    executor, so the loop keeps answering meanwhile (health probes included). Until a run
    is measured, runs go to the executor. A runner marked `inline` (the --no-compute zeros)
    always runs on the loop.
    """

    SMOOTHING = 0.1

    def __init__(self, runner: Runner, inline_under_s: float = 0.0) -> None:
        self.forced = runs_inline(runner)
        self.inline_under_s = inline_under_s
        self.seconds_per_element: float | None = None

    def inline(self, work: int) -> bool:
        if self.forced:
            return True
        rate = self.seconds_per_element
        return rate is not None and rate * work < self.inline_under_s

    def ran(self, seconds: float, work: int) -> None:
        measured = seconds / max(work, 1)
        previous = self.seconds_per_element
        self.seconds_per_element = (
            measured if previous is None else previous + self.SMOOTHING * (measured - previous)
        )


class Scheduler(Protocol):
    async def submit(self, job: InferenceJob) -> JobResult: ...

    async def close(self) -> None:
        """Stop taking jobs; finish the ones already accepted."""


class DirectScheduler:
    """One session run per job, in a bounded executor (the server's thread pool).

    Records each run in Metrics.batch_run (no padding: a job runs alone) when given metrics.
    """

    def __init__(
        self,
        runner: Runner,
        executor: Executor | None = None,
        *,
        metrics: Metrics | None = None,
        labels: tuple[str, str] = ("", ""),
        inline_under_s: float = 0.0,
    ) -> None:
        self._runner = runner
        self._executor = executor
        self._metrics = metrics
        self._labels = labels
        self._place = RunPlace(runner, inline_under_s)

    async def submit(self, job: InferenceJob) -> JobResult:
        if job.expired():
            raise DeadlineExceeded(
                f"request {job.request_id!r}: deadline passed before compute started"
            )
        start = time.monotonic()
        work = elements((job,))
        inline = not job.offload and self._place.inline(work)
        if inline:
            outputs = self._runner(job.inputs, job.outputs)
        else:
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(
                self._executor, self._runner, job.inputs, job.outputs
            )
        end = time.monotonic()
        if not job.offload:
            self._place.ran(end - start, work)
        if self._metrics is not None:
            self._metrics.batch_run(*self._labels, end - start, job.batch_size, 0.0, inline=inline)
        return JobResult(
            outputs=outputs,
            queue_ns=int((start - job.enqueued) * 1e9),
            compute_ns=int((end - start) * 1e9),
            batch_size=job.batch_size,
        )

    async def close(self) -> None:
        return None


class MergeGain:
    """Whether merging queued jobs into one session run pays, learned from the runs.

    It keeps the seconds per input element of the latest runs of one job and of merged runs
    (medians of the last WINDOW of each: one cold or disturbed run must not decide). Merging
    pays where a run's cost per element falls with its size (a GPU, which small runs leave
    idle; on CPU small requests: (1,16) costs 11.7 us a token alone and 6.3 in runs of 8);
    where it does not ((8,128) on these 2 CPU cores: 7.4 us a token alone and in runs of 32),
    merging only makes every job of a batch wait for the whole of it, and the merge copies
    the batch. So a queued batch is merged while merged runs cost under MARGIN of a lone
    run's per element, or until both are measured; otherwise its oldest job runs alone. One
    decision in EXPLORE does the other thing, so both figures follow the load (under steady
    load every run would otherwise be of one kind, and the other figure would go stale).
    """

    WINDOW = 9
    MARGIN = 0.9
    EXPLORE = 16

    def __init__(self) -> None:
        self._alone: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._merged: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.decisions = 0

    def ran(self, seconds: float, work: int, jobs: int) -> None:
        (self._alone if jobs == 1 else self._merged).append(seconds / max(work, 1))

    @property
    def alone(self) -> float | None:
        """Seconds per element of runs of one job (median of the latest), if measured."""
        return statistics.median(self._alone) if self._alone else None

    @property
    def merged(self) -> float | None:
        return statistics.median(self._merged) if self._merged else None

    def pays(self) -> bool:
        """Merged runs are the cheaper per element (or not both measured yet)."""
        alone, merged = self.alone, self.merged
        return alone is None or merged is None or merged < self.MARGIN * alone

    def merge(self) -> bool:
        """Merge the batch at hand, or run its oldest job alone."""
        self.decisions += 1
        exploring = self.decisions % self.EXPLORE == 0
        return self.pays() != exploring


class PromptsApart:
    """A sequence model's scheduler: steps through `steps` (batched), offloaded jobs (a
    prompt's chunks) through `prompts` (each its own executor run, DirectScheduler).

    A chunk then never holds the steps' run slot: the steps of the other sequences go on
    while it runs (in a thread of the executor, the cores shared), as with batching off,
    and a sequence's next chunk waits for its last. So a step waits for no chunk.
    """

    def __init__(self, steps: Scheduler, prompts: Scheduler) -> None:
        self.steps = steps
        self.prompts = prompts

    async def submit(self, job: InferenceJob) -> JobResult:
        return await (self.prompts if job.offload else self.steps).submit(job)

    async def close(self) -> None:
        await self.steps.close()
        await self.prompts.close()
