"""Real ONNX Runtime runners over exported models, and jobs to feed them (test helpers)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from mha.service.core.scheduling import InferenceJob

# Model kinds the batching tests serve: ExportOptions fields (ort target, as served by
# default). Same fields as tests/export/test_parity.py uses, so a full run exports once.
KINDS: dict[str, dict[str, object]] = {
    "self-fp32": {"self_attention": True, "attention_weights": True, "dtype": "fp32"},
    "self-fp16": {"self_attention": True, "attention_weights": True, "dtype": "fp16"},
    "cross-fp32": {"self_attention": False, "attention_weights": True, "dtype": "fp32"},
    "cross-fp16": {"self_attention": False, "attention_weights": True, "dtype": "fp16"},
    "causal-fp32": {"self_attention": True, "causal": True, "dtype": "fp32"},
}


@dataclass
class Model:
    """One exported model version with a session runner."""

    kind: str
    config: dict
    session: ort.InferenceSession

    @property
    def self_attention(self) -> bool:
        return bool(self.config["self_attention"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.config["dtype"] == "FP16" else np.float32)

    @property
    def output_sets(self) -> list[tuple[str, ...]]:
        if self.config["attention_weights"]:
            return [("output",), ("output", "attention_weights")]
        return [("output",)]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict:
        """The Runner: session.run -> outputs by name."""
        return dict(zip(outputs, self.session.run(list(outputs), dict(feeds)), strict=True))


class CountingRunner:
    """A model's real runner that counts its runs, records what each run got, and can hold.

    hold() makes the next runs wait (in the executor thread) until release(), so a test can
    queue jobs behind a run in flight without timing.
    """

    def __init__(self, run: Callable[[Mapping[str, np.ndarray], Sequence[str]], dict]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self.calls = 0
        self.samples: list[int] = []  # batch axis of each run's query
        self.widths: list[tuple[int, int]] = []  # (L, S) of each run
        self.masked: list[float] = []  # fraction of True in each run's key_padding_mask
        self.asked: list[tuple[str, ...]] = []  # outputs each run computed
        self.active = self.max_active = 0  # runs in progress, now and at most
        self._entered = threading.Semaphore(0)
        self._gate = threading.Event()
        self._gate.set()
        self.fail_next: Exception | None = None

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def entered(self) -> None:
        """Wait (off the loop) until one more run has started."""
        assert await asyncio.to_thread(self._entered.acquire, timeout=30), "no run started"

    def __call__(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict:
        mask = feeds["key_padding_mask"]
        with self._lock:
            self.calls += 1
            self.samples.append(int(feeds["query"].shape[0]))
            self.widths.append((int(feeds["query"].shape[1]), int(mask.shape[1])))
            self.masked.append(float(mask.mean()))
            self.asked.append(tuple(outputs))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self._entered.release()
        try:
            self._gate.wait(timeout=30)
            if self.fail_next is not None:
                error, self.fail_next = self.fail_next, None
                raise error
            return self._run(feeds, outputs)
        finally:
            with self._lock:
                self.active -= 1


def make_job(
    model: Model,
    rng: np.random.Generator,
    B: int,
    L: int,
    S: int,
    *,
    outputs: tuple[str, ...] = ("output",),
    padded: Sequence[int] = (),
    fully_padded: Sequence[int] = (),
    request_id: str = "job",
    deadline: float | None = None,
) -> InferenceJob:
    """A job of B samples; samples in `padded` get a random key length, `fully_padded` none.

    Self-attention models take S == L (pass the same value).
    """
    c = model.config
    inputs = {"query": rng.standard_normal((B, L, c["d_model"])).astype(model.dtype)}
    if not model.self_attention:
        inputs["key"] = rng.standard_normal((B, S, c["kdim"])).astype(model.dtype)
        inputs["value"] = rng.standard_normal((B, S, c["vdim"])).astype(model.dtype)
    mask = np.zeros((B, S), dtype=bool)
    for b in padded:
        mask[b, int(rng.integers(1, S + 1)) :] = True  # keeps at least one key
    for b in fully_padded:
        mask[b] = True
    inputs["key_padding_mask"] = mask
    return InferenceJob(request_id=request_id, inputs=inputs, outputs=outputs, deadline=deadline)


def answers_behind_a_held_run(scheduler: Any, runner: CountingRunner, jobs: Sequence) -> list:
    """The first job's run held in the runner, the rest submitted behind it, then released;
    every job's result, the scheduler closed (no timing: the hold is an event)."""

    async def main() -> list:
        runner.hold()
        first = asyncio.create_task(scheduler.submit(jobs[0]))
        await runner.entered()
        rest = [asyncio.create_task(scheduler.submit(job)) for job in jobs[1:]]
        await asyncio.sleep(0)  # let every submit reach the queue
        runner.release()
        results = await asyncio.gather(first, *rest)
        await scheduler.close()
        return results

    return asyncio.run(main())
