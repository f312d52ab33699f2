"""Timing of `mha bench export`: contestants in rotating blocks, each on an idle process.

Besides the times, it measures how many cores other processes kept busy meanwhile, so a
figure taken on a loaded machine can be told apart.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mha.export.bench_contestants import Call, Case, Contestant
from mha.export.bench_plot import OURS

BLOCK = 5  # consecutive timed runs of one contestant before the next one takes its turn
QUIET_WINDOWS, QUIET_WINDOW_SECONDS, SETTLE_MAX_SECONDS = 4, 0.005, 0.5  # see settle()


def settle() -> None:
    """Wait until this process's own threads are idle.

    ORT's intra-op pool keeps spinning for tens of ms after a run (and OpenMP's for a few
    ms); left alone, it takes a core from the next contestant, and a 2-thread OpenMP region
    then stalls on its descheduled thread. Several quiet windows in a row are required
    because the spinning comes in bursts.
    """
    quiet = 0
    deadline = time.perf_counter() + SETTLE_MAX_SECONDS
    while quiet < QUIET_WINDOWS and time.perf_counter() < deadline:
        cpu = time.process_time()
        time.sleep(QUIET_WINDOW_SECONDS)
        busy = time.process_time() - cpu
        quiet = quiet + 1 if busy < 0.1 * QUIET_WINDOW_SECONDS else 0


def busy_seconds() -> float | None:
    """CPU seconds all processes have used so far (from /proc/stat; None elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed_runs(
    calls: dict[str, Call], warmup: int, repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall, calling-thread CPU) seconds per run.

    Contestants take turns in blocks, in a rotating order, so drift (other processes, clock
    changes) hits every contestant alike; each block starts on an idle process with one
    untimed call.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    names = list(calls)
    turn = 0
    while any(len(t) < repeats for t in times.values()):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            call = calls[name]
            settle()
            call()
            for _ in range(min(BLOCK, repeats - len(times[name]))):
                cpu, start = time.thread_time(), time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start, time.thread_time() - cpu))
        turn += 1
    return times


def bench_case(
    contestants: list[Contestant], case: Case, d_model: int, warmup: int, repeats: int
) -> tuple[list[dict], float | None]:
    """Per contestant: wall median, p10, p90 (ms), max |error| vs our eager output and, on one
    thread, the CPU ms per call; and the cores other processes kept busy meanwhile."""
    query, mask = case.inputs(d_model)
    calls = {c.name: c.prepare(query, mask) for c in contestants}
    outputs = {c.name: c.to_numpy(calls[c.name]()) for c in contestants}
    gc.collect()
    wall, own, busy = time.perf_counter(), time.process_time(), busy_seconds()
    times = timed_runs(calls, warmup, repeats)
    busy_after = busy_seconds()
    others = None
    if busy is not None and busy_after is not None:
        own_cpu = time.process_time() - own
        others = max(0.0, (busy_after - busy - own_cpu) / (time.perf_counter() - wall))
    reference = outputs[OURS].astype(np.float64)
    single_thread = case_threads() == 1
    rows = []
    for name, runs in times.items():
        ms = np.asarray([w for w, _ in runs]) * 1e3
        cpu_ms = float(np.median([c for _, c in runs]) * 1e3) if single_thread else None
        rows.append(
            {
                "case": case.id,
                "B": case.batch,
                "L": case.length,
                "padded": case.padded,
                "contestant": name,
                "median_ms": float(np.median(ms)),
                "p10_ms": float(np.percentile(ms, 10)),
                "p90_ms": float(np.percentile(ms, 90)),
                # all work runs on the calling thread then, so this ignores time spent
                # descheduled: a figure that other processes' load barely moves
                "cpu_median_ms": cpu_ms,
                "runs": len(ms),
                "max_abs_error": float(np.abs(outputs[name] - reference).max()),
                "other_processes_cores": others,
            }
        )
    return rows, others


def case_threads() -> int:
    """torch's intra-op thread count, which time_cases() sets to the ORT sessions' count."""
    import torch

    return torch.get_num_threads()


def cores() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def time_cases(
    contestants: list[Contestant],
    cases: list[Case],
    d_model: int,
    runs: tuple[int, int, int],
    say: Callable[[str], None],
) -> list[dict]:
    """bench_case over every case; runs = (warmup, repeats, threads), torch's threads restored."""
    import torch

    warmup, repeats, threads = runs
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with torch.inference_mode():
            for case in cases:
                say(f"timing {case.id}: {len(contestants)} contestants x {repeats} runs")
                case_rows, others = bench_case(contestants, case, d_model, warmup, repeats)
                rows += case_rows
                if others is not None:
                    say(f"  other processes kept {others:.2f} of {cores()} cores busy")
    finally:
        torch.set_num_threads(threads_before)
    return rows
