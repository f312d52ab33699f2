"""Admission refusals, answered alike in every scenario: sent again after a growing pause.

A server that would make a request wait too long refuses it up front with UNAVAILABLE and
the expected queue time in its details ("expected queue time 2872 ms is over the limit of
1000 ms (15 requests ahead)"), before any compute: the request, and a sequence it belongs
to, are unchanged, and the protocol says to try again later. A workload sends it again
after RETRY_PAUSE_S times the attempt number, up to RETRIES times, and counts each refusal;
its time counts the waits. `mha bench flood` alone keeps refusals as answers: they are
what it measures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

RETRIES = 20  # refusals of one request sent again
RETRY_PAUSE_S = 0.05  # times the attempt number
REFUSAL = "UNAVAILABLE"

T = TypeVar("T")


class Refusals:
    """Counts the refusals a run's requests met (each one sent again)."""

    def __init__(self) -> None:
        self.count = 0

    async def retried(self, attempt: Callable[[], Awaitable[T]], code: Callable[[T], str]) -> T:
        """attempt() until code(result) is not a refusal or RETRIES were sent again."""
        for tries in range(1, RETRIES + 2):
            result = await attempt()
            if code(result) != REFUSAL or tries > RETRIES:
                return result
            self.count += 1
            await asyncio.sleep(RETRY_PAUSE_S * tries)
        raise AssertionError("unreachable")  # the loop returns on its last pass
