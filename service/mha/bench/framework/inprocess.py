"""The in-process baseline: ONNX Runtime's session.run in the bench process, no wire.

Same model file and request mix as the served runs. `merge` > 1 joins that many requests
into one session run (right-padded to the longest, key_padding_mask marking the padding),
which is the best an ideal batcher could do; the batching target's bound uses the best
merge size.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mha import contract
from mha.bench.framework.unary import LoadResult
from mha.service.core import padding

MASK = contract.KEY_PADDING_MASK


def make_session(model_file: Path, threads: int | None) -> Any:
    """A CPU session as a user's own process would have it: the server's options but ORT's
    default spinning threads (nothing else shares the cores there). threads: None = the
    server's default."""
    import onnxruntime as ort

    from mha.service.core import devices, runtime

    options = runtime.session_options(threads or devices.default_threads(), spinning=True)
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def _key_length(arrays: Mapping[str, np.ndarray]) -> int:
    return int(arrays.get(contract.KEY, arrays[contract.QUERY]).shape[1])


def with_mask(arrays: Mapping[str, np.ndarray], graph_inputs: Sequence[str]) -> dict:
    """Feeds for every graph input; an omitted mask is all False (nothing padded)."""
    feeds = dict(arrays)
    if MASK in graph_inputs and MASK not in feeds:
        batch = arrays[contract.QUERY].shape[0]
        feeds[MASK] = np.zeros((batch, _key_length(arrays)), dtype=bool)
    return feeds


def batches(
    pool: Sequence[Mapping[str, np.ndarray]], graph_inputs: Sequence[str], size: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Feeds to cycle through: each request alone (size 1) or random groups of `size`."""
    single = [with_mask(a, graph_inputs) for a in pool]
    if size == 1:
        return single
    rng = random.Random(seed)
    return [
        padding.merge(
            rng.sample(single, size) if size <= len(single) else rng.choices(single, k=size)
        ).feeds
        for _ in range(16)
    ]


def run_inprocess(
    session: Any,
    feeds: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[str],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_requests: int = 0,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Call session.run from `concurrency` threads; latencies are per call."""
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    latencies: list[float] = []
    lock = threading.Lock()
    last_end = [measure_from]

    def caller(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while True:
            now = time.perf_counter()
            with lock:
                if now >= stop_at or (max_requests and len(latencies) >= max_requests):
                    return
            began = time.perf_counter()
            session.run(list(outputs), rng.choice(feeds))
            end = time.perf_counter()
            if began >= measure_from:
                with lock:
                    latencies.append(end - began)
                    last_end[0] = max(last_end[0], end)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.2)
        if on_progress is not None:
            on_progress(len(latencies))
    return LoadResult(np.array(latencies), {}, last_end[0] - measure_from, len(latencies))
