"""Admission: bound a model version's waiting in time, not only in count.

A request is admitted after its headers passed (so a malformed one gets its own error) and
before its tensors are decoded. Its work is the number of input elements it declares (a
sequence step's: those and the past rows it reads, the data plane's count); the
backlog is the work admitted and not yet answered. The service rate (work per second while
the backlog is not empty) is measured from the answers themselves, over windows of at least
WINDOW_SECONDS of busy time, smoothed. So the expected wait of a new request is
backlog / rate, and it is refused at once, before any decoding or queueing:
  - UNAVAILABLE (retryable) when the expected wait is over max_delay (--max-queue-delay-ms);
  - DEADLINE_EXCEEDED when the wait plus its own work cannot end before its deadline.
Until the first answer nothing is refused (there is no estimate yet); the first answer
gives the first measure, later ones refine it. The rate
includes everything between admission and answer (decoding, queueing, the session runs,
batching), so it is what a client sees, on whatever device and load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mha.service.core.errors import DeadlineExceeded, Unavailable

WINDOW_SECONDS = 0.05  # busy time per rate measurement
WINDOW_ANSWERS = 4  # and at least this many answers
SMOOTHING = 0.3  # weight of the newest window


def _ms(seconds: float) -> str:
    """Milliseconds, whole from 1 ms up, three significant digits below (0.0123 ms)."""
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 1 else f"{ms:.3g} ms"


def _subject(request_id: str) -> str:
    return f"request {request_id!r}: " if request_id else ""


class QueueDelay(Unavailable):
    reason = "queue_delay"


@dataclass
class Ticket:
    """One admitted request's work; leaving returns it (a context manager)."""

    admission: Admission
    work: int

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.admission.leave(self.work, answered=kind is None)


class Admission:
    """One model version's backlog and measured rate; `admit` or refuse."""

    def __init__(self, max_delay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_delay_s = max_delay_s  # 0 = never refuse for delay
        self.clock = clock
        self.backlog = 0  # work admitted, not answered
        self.requests = 0  # requests admitted, not answered
        self.rate: float | None = None  # work per busy second
        self._busy_since: float | None = None
        self._window_busy = 0.0
        self._window_work = 0
        self._window_answers = 0

    def expected_wait(self) -> float:
        """Seconds until the backlog is answered, at the measured rate (0 before a measure)."""
        if self.rate is None or self.backlog == 0:
            return 0.0
        return self.backlog / self.rate

    def admit(self, request_id: str, work: int, deadline: float | None) -> Ticket:
        """A ticket for the request, or QueueDelay / DeadlineExceeded at once."""
        wait = self.expected_wait()
        if self.max_delay_s > 0 and wait > self.max_delay_s:
            raise QueueDelay(
                f"{_subject(request_id)}expected queue time {_ms(wait)} is over the "
                f"limit of {_ms(self.max_delay_s)} ({self.requests} requests ahead); "
                f"retry later or on another replica"
            )
        now = self.clock()
        if deadline is not None and self.rate is not None:
            finish = wait + work / self.rate
            if now + finish > deadline:
                raise DeadlineExceeded(
                    f"{_subject(request_id)}expected to finish in {finish * 1e3:.0f} ms "
                    f"({self.requests} requests ahead), after its deadline "
                    f"({max(0.0, deadline - now) * 1e3:.0f} ms left); refused before compute"
                )
        if self.backlog == 0:
            self._busy_since = now
        self.backlog += work
        self.requests += 1
        return Ticket(self, work)

    def leave(self, work: int, *, answered: bool = True) -> None:
        """A request answered or failed: its work leaves the backlog; answered work counts
        toward the rate (a refusal after admission is quick and would inflate it)."""
        now = self.clock()
        self.backlog -= work
        self.requests -= 1
        if answered:
            self._window_work += work
            self._window_answers += 1
        busy = self._window_busy
        if self._busy_since is not None:
            busy += now - self._busy_since
        if self.backlog == 0:
            self._window_busy, self._busy_since = busy, None
        # The first answer gives the first measure at once: until then nothing is refused,
        # and a burst arriving at a cold server would otherwise all be admitted.
        first = self.rate is None and self._window_answers > 0 and busy > 0
        if first or (busy >= WINDOW_SECONDS and self._window_answers >= WINDOW_ANSWERS):
            measured = self._window_work / busy
            self.rate = (
                measured
                if self.rate is None
                else SMOOTHING * measured + (1 - SMOOTHING) * self.rate
            )
            self._window_work = self._window_answers = 0
            self._window_busy = 0.0
            if self._busy_since is not None:
                self._busy_since = now
