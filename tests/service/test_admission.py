"""Admission bounds the queue in time: the estimate (a fake clock), and a real server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from service_helpers import RunningServer, random_inputs, settings_for

from mha.service.core.admission import WINDOW_ANSWERS, Admission, QueueDelay
from mha.service.core.errors import DeadlineExceeded
from mha.service.grpc import codec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _measured(clock: Clock, max_delay_s: float = 0.5) -> Admission:
    """An admission whose rate is measured: 1,000 work units per second."""
    admission = Admission(max_delay_s, clock)
    for _ in range(WINDOW_ANSWERS * 25):
        with admission.admit("warm", 1, None):
            clock.now += 0.001
    assert admission.rate == pytest.approx(1000.0)
    return admission


def test_the_first_answer_gives_the_first_measure():
    clock = Clock()
    admission = Admission(0.5, clock)
    first = admission.admit("first", 100, None)
    admission.admit("second", 100, None)  # no estimate yet: admitted
    clock.now += 0.1
    first.__exit__(None)  # 100 units in 0.1 s busy
    assert admission.rate == pytest.approx(1000.0)
    assert admission.expected_wait() == pytest.approx(0.1)


def test_a_limit_under_a_millisecond_is_named_as_set():
    clock = Clock()
    admission = Admission(0.00002, clock)  # 0.02 ms
    first = admission.admit("first", 100, None)
    clock.now += 0.1
    first.__exit__(None)  # 1000 units a second
    admission.admit("ahead", 1, None)  # 1 ms ahead
    with pytest.raises(QueueDelay) as caught:
        admission.admit("late", 1, None)
    assert "expected queue time 1 ms is over the limit of 0.02 ms" in str(caught.value)


def test_nothing_is_refused_before_a_rate_is_measured():
    admission = Admission(0.001, Clock())
    tickets = [admission.admit(str(i), 10**9, None) for i in range(10)]
    assert admission.backlog == 10 * 10**9 and admission.rate is None
    for ticket in tickets:
        ticket.__exit__(None)
    assert admission.backlog == 0


def test_the_expected_wait_refuses_over_the_limit_and_names_it():
    clock = Clock()
    admission = _measured(clock)
    held = [admission.admit(f"r{i}", 150, None) for i in range(3)]  # 450 units: 0.45 s ahead
    assert admission.expected_wait() == pytest.approx(0.45)
    ticket = admission.admit("fits", 150, None)  # under the limit: admitted
    with pytest.raises(QueueDelay) as caught:
        admission.admit("late", 1, None)  # 600 units ahead: 0.6 s
    message = str(caught.value)
    assert "expected queue time 600 ms is over the limit of 500 ms" in message
    assert "4 requests ahead" in message and "retry" in message
    assert caught.value.code.name == "UNAVAILABLE"
    for t in (*held, ticket):
        t.__exit__(None)
    admission.admit("after", 1, None).__exit__(None)  # the backlog gone: admitted again


def test_a_deadline_that_cannot_be_met_is_refused_before_compute():
    clock = Clock()
    admission = _measured(clock, max_delay_s=0)  # no delay limit: the deadline alone
    held = admission.admit("ahead", 200, None)  # 0.2 s ahead
    admission.admit("fits", 50, deadline=clock.now + 0.3).__exit__(None)  # 0.25 s <= 0.3 s
    with pytest.raises(DeadlineExceeded, match="expected to finish in 250 ms"):
        admission.admit("late", 50, deadline=clock.now + 0.2)
    held.__exit__(None)


def test_failed_requests_leave_the_backlog_but_do_not_speed_up_the_rate():
    clock = Clock()
    admission = _measured(clock)
    for _ in range(WINDOW_ANSWERS * 25):
        ticket = admission.admit("bad", 10**6, None)
        clock.now += 0.001
        ticket.__exit__(ValueError)  # refused after admission (e.g. a NaN in its data)
    assert admission.backlog == 0 and admission.requests == 0
    # Their 10**8 units of work never count: the rate is not sped up (their time, spent
    # without answered work, may only slow it down).
    assert admission.rate is not None and admission.rate <= 1000.0 + 1e-6


def test_a_server_refuses_at_once_while_its_backlog_is_too_long(repository: Path):
    """Measure a rate, hold the only run, then a second request is refused, not queued."""
    release, entered = threading.Event(), threading.Event()
    holding = threading.Event()

    def wrap(runner):
        def run(feeds, names):
            if holding.is_set():
                entered.set()
                release.wait(60)
            return runner(feeds, names)

        return run

    # 0.001 ms: any backlog at the measured rate is over the limit.
    # The held run must be in the executor, so the loop answers meanwhile: no inline runs.
    settings = settings_for(repository, max_queue_delay_ms=0.001, inline_runs_under_us=0)
    server = RunningServer(settings, wrap_runner=wrap).load()
    try:
        request = codec.infer_request("self", random_inputs("self"))
        admission = server.server.plane.table.served["self", 1].admission
        while admission.rate is None:  # answers until a rate is measured (no limit yet)
            server.stub.ModelInfer(request, timeout=60)
        holding.set()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.stub.ModelInfer, request, timeout=60)
            assert entered.wait(60)
            with pytest.raises(grpc.RpcError) as caught:
                server.stub.ModelInfer(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "expected queue time" in caught.value.details()
            assert "over the limit of 0.001 ms" in caught.value.details()
            release.set()
            assert codec.response_arrays(first.result(60))["output"].shape == (2, 5, 64)
        holding.clear()
        server.stub.ModelInfer(request, timeout=60)  # the backlog gone: served again
    finally:
        release.set()
        server.close()
