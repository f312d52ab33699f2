"""Random requests against a real server: never INTERNAL or UNKNOWN, and it keeps serving.

Hypothesis draws the calls (fuzz_strategies), fuzz_property checks each answer and then
probes the server with good requests. Derandomized and bounded, so the run is the same
every time and takes seconds; `make fuzz` runs the same strategies for minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fuzz_property import SERVER_SETTINGS, Fuzzer, raise_for
from fuzz_strategies import (
    MODELS,
    Call,
    garbage_calls,
    infer_calls,
    reflection_calls,
    sequence_calls,
    stream_calls,
)
from harness import RunningServer, link_repository, settings_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SHORT = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@pytest.fixture(scope="module")
def fuzzer(
    exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzer]:
    repo = link_repository(tmp_path_factory.mktemp("fuzz-repo"), exported, MODELS)
    server = RunningServer(settings_for(repo, **SERVER_SETTINGS)).load()
    yield Fuzzer(server.channel)
    server.close()


def fuzz(fuzzer: Fuzzer, calls: st.SearchStrategy[Call], examples: int) -> None:
    """Each call answered acceptably, then good requests answered right."""

    @settings(max_examples=examples, **SHORT)
    @given(call=calls)
    def check(call: Call) -> None:
        raise_for(fuzzer.run(call) + fuzzer.probe(), call)

    check()


def test_infer_requests(fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, infer_calls(), 200)
    # The strategies reach the models, not only the refusals (a guard on the fuzz itself).
    assert {"self", "cross", "self_fp16"} <= set(fuzzer.served), fuzzer.summary(40)


def test_sequence_requests(fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, sequence_calls(), 150)
    assert {"kv", "xkv"} <= set(fuzzer.served), fuzzer.summary(40)


def test_raw_bytes_on_every_rpc(fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, garbage_calls() | reflection_calls(), 150)


def test_streams(fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, stream_calls(), 80)
    assert fuzzer.counts["ModelStreamInfer answer OK"] > 0, fuzzer.summary()
