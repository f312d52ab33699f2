"""Cross-attention memory sequences through a real server: the memory is sent once.

The oracle of every step is the stateless cross-attention export of the same weights (the
seeded default), given the whole memory again: what a client without the server's memory
would have to send every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from harness import RunningServer, link_repository, settings_for

from mha import contract
from mha.client import AsyncClient, Client, ClientError, SequenceStep

E, KDIM, VDIM = 64, 48, 40
ATOL = contract.PARITY_TOLERANCE["FP32"][0]
CROSS = {"self_attention": False, "kdim": KDIM, "vdim": VDIM}
MODELS = {
    "xkv": {"target": "ort", "kv_cache": True, **CROSS},
    "xkv_onnx": {"target": "onnx", "kv_cache": True, **CROSS},
    "xkv_none": {"target": "none", "kv_cache": True, **CROSS},
    "cross": {"target": "ort", **CROSS},
}


@pytest.fixture(scope="module")
def repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_repository(tmp_path_factory.mktemp("memory-repo"), exported, MODELS)


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    running = RunningServer(settings_for(repo, batching=True)).load()
    yield running
    running.close()


@pytest.fixture(scope="module")
def stateless(repo: Path) -> Callable[..., np.ndarray]:
    session = ort.InferenceSession(
        str(repo / "cross" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(query: np.ndarray, memory: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {contract.QUERY: query, **memory}
        return session.run([contract.OUTPUT], feeds)[0]

    return run


def memory_of(rng: np.random.Generator, length: int, padded: int = 0) -> dict[str, np.ndarray]:
    mask = np.zeros((1, length), bool)
    if padded:
        mask[0, length - padded :] = True
    return {
        contract.KEY: rng.standard_normal((1, length, KDIM)).astype(np.float32),
        contract.VALUE: rng.standard_normal((1, length, VDIM)).astype(np.float32),
        contract.KEY_PADDING_MASK: mask,
    }


def queries(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    return [rng.standard_normal((1, n, E)).astype(np.float32) for n in sizes]


def check(stateless, memory, sent, answers) -> None:  # type: ignore[no-untyped-def]
    for step, (query, answer) in enumerate(zip(sent, answers, strict=True)):
        want = stateless(query, memory)
        np.testing.assert_allclose(answer, want, rtol=0, atol=ATOL, err_msg=f"step {step}")


@pytest.mark.parametrize("model", ["xkv", "xkv_onnx", "xkv_none"])
def test_unary_steps_over_a_padded_memory(server, stateless, model) -> None:
    rng = np.random.default_rng(1)
    memory = memory_of(rng, 13, padded=4)
    sent = queries(rng, [3, 1, 1, 2, 1])
    with Client(server.url) as client:
        answers = []
        for i, query in enumerate(sent):
            inputs = {contract.QUERY: query, **(memory if i == 0 else {})}
            step = SequenceStep(21, start=i == 0, end=i == len(sent) - 1)
            answers.append(client.infer(model, inputs, sequence=step).outputs["output"])
    check(stateless, memory, sent, answers)


def test_32_streamed_steps_and_concurrent_memories_of_different_lengths(server, stateless) -> None:
    """16 sequences with memories of S in 1..40 stepped at once: steps of different S batch."""
    rng = np.random.default_rng(2)
    plans = {
        100 + i: (memory_of(rng, int(rng.integers(1, 41)), padded=i % 3),
                  queries(rng, [2] + [1] * 31))
        for i in range(16)
    }  # fmt: skip

    async def decode(client: AsyncClient, sequence_id: int) -> list[np.ndarray]:
        memory, sent = plans[sequence_id]
        answers = []
        async with client.stream() as stream:
            for i, query in enumerate(sent):
                inputs = {contract.QUERY: query, **(memory if i == 0 else {})}
                await stream.send(
                    "xkv",
                    inputs,
                    request_id=str(i),
                    sequence=SequenceStep(sequence_id, i == 0, i == len(sent) - 1),
                )
                answer = await stream.receive()
                assert answer.error is None, answer.error
                answers.append(answer.result.outputs["output"])  # type: ignore[union-attr]
        return answers

    async def main() -> list[list[np.ndarray]]:
        async with AsyncClient(server.url) as client:
            return await asyncio.gather(*(decode(client, s) for s in plans))

    for (memory, sent), answers in zip(plans.values(), asyncio.run(main()), strict=True):
        check(stateless, memory, sent, answers)


def test_a_fully_padded_memory_gives_zero_rows(server) -> None:
    memory = memory_of(np.random.default_rng(3), 5, padded=5)
    query = np.ones((1, 2, E), np.float32)
    with Client(server.url) as client:
        result = client.infer("xkv", {contract.QUERY: query, **memory},
                              sequence=SequenceStep(5, start=True, end=True))  # fmt: skip
    np.testing.assert_array_equal(result.outputs["output"], np.zeros((1, 2, E), np.float32))


def refusal(client: Client, model: str, inputs, sequence) -> ClientError:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as caught:
        client.infer(model, inputs, sequence=sequence)
    return caught.value


def test_memory_rules_are_clear_errors(server) -> None:
    rng = np.random.default_rng(4)
    memory = memory_of(rng, 6)
    query = queries(rng, [1])[0]
    with Client(server.url) as client:
        no_memory = refusal(client, "xkv", {contract.QUERY: query}, SequenceStep(41, start=True))
        assert no_memory.code == grpc.StatusCode.INVALID_ARGUMENT
        assert no_memory.details == (
            "sequence 41 of model 'xkv' version 1: the request with sequence_start carries the "
            "memory the sequence attends: inputs 'key' and 'value' (and optionally "
            "'key_padding_mask'); missing 'key', 'value'"
        )
        client.infer("xkv", {contract.QUERY: query, **memory}, sequence=SequenceStep(42, True))
        again = refusal(client, "xkv", {contract.QUERY: query, **memory}, SequenceStep(42))
        assert again.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'key', 'value', 'key_padding_mask' may come only with sequence_start" in (
            again.details
        )
        bad_mask = {**memory, contract.KEY_PADDING_MASK: np.zeros((1, 5), bool)}
        wrong = refusal(client, "xkv", {contract.QUERY: query, **bad_mask}, SequenceStep(43, True))
        assert wrong.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'key_padding_mask': sequence length 5 does not match key's 6" in wrong.details
        stateless_query = refusal(client, "cross", {contract.QUERY: query}, None)
        assert stateless_query.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing input 'key' for model 'cross'" in stateless_query.details
        assert "--cross --kv-cache holds a sequence's memory" in stateless_query.details
        # the sequence with a memory still steps after the refusals
        client.infer("xkv", {contract.QUERY: query}, sequence=SequenceStep(42, end=True))


def test_the_memory_counts_against_the_budget(repo: Path) -> None:
    memory = memory_of(np.random.default_rng(5), 16)
    one = 2 * 16 * E * 4
    server = RunningServer(settings_for(repo, kv_cache_bytes=one)).load()
    try:
        with Client(server.url) as client:
            inputs = {contract.QUERY: np.ones((1, 1, E), np.float32), **memory}
            client.infer("xkv", inputs, sequence=SequenceStep(1, start=True))
            full = refusal(client, "xkv", inputs, SequenceStep(2, start=True))
            assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"of the budget of {one} (--kv-cache-bytes)" in full.details
        registry = server.server.metrics.registry
        assert registry.get_sample_value("mha_sequence_cache_bytes") == one
    finally:
        server.close()
