"""Rounds: every contender over every workload, repeated, the order rotating per round.

With one round and `one_at_a_time`, each contender runs all its workloads before the next
one starts (so no idle server shares the cores). Otherwise every contender is up at once
and each round runs every workload for every contender in turn, starting one contender
later each round, so a busy minute of a shared machine falls on all of them alike; a
workload's repeats are pooled by the scenario.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

W = TypeVar("W", bound=Hashable)


def schedule(
    contenders: Sequence[str],
    workloads: Callable[[str], Sequence[W]],
    rounds: int,
    one_at_a_time: bool = False,
) -> list[tuple[int, str, W]]:
    """(round, contender, workload) in the order they are measured."""
    if rounds == 1 and one_at_a_time:
        return [(0, c, w) for c in contenders for w in workloads(c)]
    plans = {c: list(workloads(c)) for c in contenders}
    every = list(dict.fromkeys(w for c in contenders for w in plans[c]))
    order = []
    for index in range(rounds):
        for workload in every:
            having = [c for c in contenders if workload in plans[c]]
            turn = index % len(having)
            order += [(index, c, workload) for c in having[turn:] + having[:turn]]
    return order


R = TypeVar("R")


def run_rounds(
    measure: Mapping[str, Callable[[W, str], R]],
    workloads: Callable[[str], Sequence[W]],
    rounds: int,
    tag: Callable[[str, W, int], str],
) -> tuple[dict[tuple[str, W], list[R]], list[tuple[int, str, W]]]:
    """Every contender's workloads, `rounds` times interleaved; each (contender, workload)'s
    results in order, and the order they were measured in."""
    order = schedule(list(measure), workloads, rounds)
    runs: dict[tuple[str, W], list[R]] = {}
    for index, name, workload in order:
        runs.setdefault((name, workload), []).append(
            measure[name](workload, tag(name, workload, index))
        )
    return runs, order
