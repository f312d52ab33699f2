"""Stateful decoding through a real server: every step equals the full causal forward.

The oracle of a step is the same exported step graph run locally from an empty cache over
the whole sequence so far (P = 0, T = every token): the full causal forward, which the
export proved equal to eager PyTorch. The server's answer for the step must be the last T
rows of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import RunningServer, link_repository, settings_for
from sequence_helpers import E, FullForward, check_steps, chunks, decode_concurrently

from mha.client import Client, ClientError, SequenceStep
from mha.service.grpc import codec

KV_MODELS = {
    "kv": {"target": "ort", "kv_cache": True},
    "kv_onnx": {"target": "onnx", "kv_cache": True},
    "kv_none": {"target": "none", "kv_cache": True},
}
MODELS = {**KV_MODELS, "self": {"target": "ort"}}


@pytest.fixture(scope="module")
def seq_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_repository(tmp_path_factory.mktemp("seq-repo"), exported, MODELS)


@pytest.fixture(scope="module")
def server(seq_repo: Path) -> Iterator[RunningServer]:
    """Batching on: steps of different sequences that meet in the queue share runs."""
    running = RunningServer(settings_for(seq_repo, batching=True)).load()
    yield running
    running.close()


@pytest.mark.parametrize("model", sorted(KV_MODELS))
def test_unary_steps_equal_the_full_causal_forward(server, seq_repo, model) -> None:
    sizes = [5, 1, 1, 1, 3, 1]  # a prompt, single steps and a multi-token step
    sent = chunks(np.random.default_rng(1), sizes)
    answers = []
    with Client(server.url) as client:
        for i, query in enumerate(sent):
            step = SequenceStep(101, start=i == 0, end=i == len(sent) - 1)
            result = client.infer(model, {"query": query}, sequence=step)
            answers.append(result.outputs["output"])
    check_steps(FullForward(seq_repo / model / "1"), sent, answers)


def test_the_prompt_may_come_in_several_requests(server, seq_repo) -> None:
    sent = chunks(np.random.default_rng(2), [1, 1, 4, 2])
    with Client(server.url) as client:
        answers = [
            client.infer("kv", {"query": q}, sequence=SequenceStep("s-2", start=i == 0))
            .outputs["output"]
            for i, q in enumerate(sent)
        ]  # fmt: skip
        client.infer("kv", {"query": sent[0]}, sequence=SequenceStep("s-2", end=True))
    check_steps(FullForward(seq_repo / "kv" / "1"), sent, answers)


def test_interleaved_sequences_from_concurrent_clients(server, seq_repo) -> None:
    """32 sequences of ragged lengths decoded at once; each equals itself decoded alone."""
    rng = np.random.default_rng(3)
    plans = {1000 + i: chunks(rng, [int(rng.integers(1, 9)), *[1] * 5, 2]) for i in range(32)}

    oracle = FullForward(seq_repo / "kv" / "1")
    for sequence_id, answers in zip(
        plans, decode_concurrently(server.url, "kv", plans), strict=True
    ):
        check_steps(oracle, plans[sequence_id], answers)


def test_stream_decodes_interleaved_sequences(server, seq_repo) -> None:
    rng = np.random.default_rng(4)
    plans = {f"st-{i}": chunks(rng, [3 + i, 1, 1, 2, 1]) for i in range(8)}
    answers: dict[str, list[np.ndarray]] = {s: [] for s in plans}
    with Client(server.url) as client, client.stream() as stream:
        for step in range(5):  # round robin: the sequences' requests interleave on the wire
            for sequence_id, sent in plans.items():
                control = SequenceStep(sequence_id, start=step == 0, end=step == 4)
                stream.send("kv", {"query": sent[step]}, request_id=f"{sequence_id}/{step}",
                            sequence=control)  # fmt: skip
        by_id = {}
        for answer in stream.answers(5 * len(plans)):
            assert answer.error is None, answer.error
            by_id[answer.id] = answer.result.outputs["output"]  # type: ignore[union-attr]
    oracle = FullForward(seq_repo / "kv" / "1")
    for sequence_id, sent in plans.items():
        answers[sequence_id] = [by_id[f"{sequence_id}/{step}"] for step in range(5)]
        check_steps(oracle, sent, answers[sequence_id])


def test_stream_error_answers_one_request_and_the_stream_stays_open(server) -> None:
    query = chunks(np.random.default_rng(5), [2])[0]
    with Client(server.url) as client, client.stream() as stream:
        stream.send("kv", {"query": query}, request_id="lost", sequence=SequenceStep(77))
        refused = stream.receive()
        stream.send("kv", {"query": query}, request_id="ok", sequence=SequenceStep(77, True, True))
        served = stream.receive()
    assert refused.id == "lost" and refused.error is not None
    assert refused.error.code == grpc.StatusCode.NOT_FOUND
    assert "sequence 77 of model 'kv' version 1 is not active" in refused.error.details
    assert served.id == "ok" and served.error is None
    assert served.result is not None and served.result.outputs["output"].shape == (1, 2, E)


def test_stream_of_a_stateless_model(server) -> None:
    query = np.ones((2, 3, E), np.float32)
    with Client(server.url) as client, client.stream() as stream:
        stream.send("self", {"query": query}, request_id="plain")
        answer = stream.receive()
        unary = client.infer("self", {"query": query}).outputs["output"]
    assert answer.error is None and answer.result is not None
    np.testing.assert_array_equal(answer.result.outputs["output"], unary)


def test_a_second_request_of_a_sequence_waits_its_turn(server, seq_repo) -> None:
    """Requests of one sequence sent at once are answered as if sent one after the other."""
    sent = chunks(np.random.default_rng(6), [4, 1, 1, 1, 1, 1])
    with Client(server.url) as client:
        first = client.infer("kv", {"query": sent[0]}, sequence=SequenceStep(55, start=True))
        with client.stream() as stream:  # all in flight at once; they start in arrival order
            for i, query in enumerate(sent[1:], start=1):
                stream.send("kv", {"query": query}, request_id=str(i), sequence=SequenceStep(55))
            got = {a.id: a for a in stream.answers(len(sent) - 1)}
    answers = [first.outputs["output"]] + [
        got[str(i)].result.outputs["output"]  # type: ignore[union-attr]
        for i in range(1, len(sent))
    ]
    check_steps(FullForward(seq_repo / "kv" / "1"), sent, answers)


def test_closing_a_stream_ends_its_sequences(server) -> None:
    query = chunks(np.random.default_rng(7), [2])[0]
    with Client(server.url) as client:
        stream = client.stream()
        stream.send("kv", {"query": query}, sequence=SequenceStep("owned", start=True))
        assert stream.receive().error is None
        stream.close()
        with pytest.raises(ClientError, match="the stream ended"):
            stream.receive()  # the server ended the stream, and its sequences before that
        with pytest.raises(ClientError) as ended:
            client.infer("kv", {"query": query}, sequence=SequenceStep("owned"))
    assert ended.value.code == grpc.StatusCode.NOT_FOUND
    assert "ended with the stream it ran on" in ended.value.details


def test_start_restarts_and_end_frees(server, seq_repo) -> None:
    rng = np.random.default_rng(8)
    first, again = chunks(rng, [3, 1]), chunks(rng, [2, 1])
    with Client(server.url) as client:
        for query, start in ((first[0], True), (first[1], False)):
            client.infer("kv", {"query": query}, sequence=SequenceStep(9, start=start))
        answers = [
            client.infer("kv", {"query": again[0]}, sequence=SequenceStep(9, start=True)),
            client.infer("kv", {"query": again[1]}, sequence=SequenceStep(9, end=True)),
        ]
        with pytest.raises(ClientError) as gone:
            client.infer("kv", {"query": again[1]}, sequence=SequenceStep(9))
    check_steps(FullForward(seq_repo / "kv" / "1"), again, [a.outputs["output"] for a in answers])
    assert gone.value.code == grpc.StatusCode.NOT_FOUND
    assert "sequence 9 of model 'kv' version 1 is not active" in gone.value.details


def raw_request(model: str, query: np.ndarray, **parameters: object) -> object:
    request = codec.infer_request(model, {"query": query})
    for name, value in parameters.items():
        param = request.parameters[name]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)
    return request


ONE = np.zeros((1, 2, E), np.float32)
BAD_REQUESTS = [
    ("no-sequence-id", "kv", ONE, {}, grpc.StatusCode.INVALID_ARGUMENT,
     "model 'kv' is a sequence model: every request needs a sequence_id"),
    ("not-started", "kv", ONE, {"sequence_id": 4242}, grpc.StatusCode.NOT_FOUND,
     "sequence 4242 of model 'kv' version 1 is not active; its first request must set "
     "sequence_start"),
    ("batch-of-two", "kv", np.zeros((2, 2, E), np.float32),
     {"sequence_id": 5, "sequence_start": True}, grpc.StatusCode.INVALID_ARGUMENT,
     "sequence 5 of model 'kv' version 1: input 'query' has batch size 2; a sequence request "
     "carries exactly one sequence (batch size 1)"),
    ("id-is-a-bool", "kv", ONE, {"sequence_id": True}, grpc.StatusCode.INVALID_ARGUMENT,
     "parameter 'sequence_id' must be an int64_param or a string_param, got True"),
    ("id-is-a-double", "kv", ONE, {"sequence_id": 1.5}, grpc.StatusCode.INVALID_ARGUMENT,
     "parameter 'sequence_id' must be an int64_param or a string_param, got 1.5"),
    ("start-is-an-int", "kv", ONE, {"sequence_id": 6, "sequence_start": 1},
     grpc.StatusCode.INVALID_ARGUMENT, "parameter 'sequence_start' must be a bool_param, got 1"),
    ("stateless-with-id", "self", ONE, {"sequence_id": 7, "sequence_start": True},
     grpc.StatusCode.INVALID_ARGUMENT, "model 'self' is not a sequence model"),
    ("wrong-width", "kv", np.zeros((1, 2, E + 1), np.float32),
     {"sequence_id": 8, "sequence_start": True}, grpc.StatusCode.INVALID_ARGUMENT,
     f"input 'query': dimension 2 is {E + 1}, expected {E} (d_model)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "query", "parameters", "code", "details"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_sequence_request_then_a_good_one(server, model, query, parameters, code, details):
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ModelInfer(raw_request(model, query, **parameters), timeout=30)
    assert caught.value.code() == code
    assert details in caught.value.details()
    good = raw_request("kv", ONE, sequence_id=31337, sequence_start=True, sequence_end=True)
    assert server.stub.ModelInfer(good, timeout=30).outputs[0].shape == [1, 2, E]


NO_TORCH_SCRIPT = """
import asyncio, sys
from pathlib import Path
import numpy as np
from mha.client import AsyncClient, SequenceStep
from mha.service.core import settings
from mha.service.grpc import server

async def go():
    s = server.Server(settings.Settings(host="127.0.0.1", port=0, metrics_port=None,
                                        repository=Path(sys.argv[1])))
    port = await s.start()
    await s.load_models()
    async with AsyncClient(f"127.0.0.1:{port}") as client, client.stream() as stream:
        for i in range(3):
            await stream.send("kv", {"query": np.ones((1, 2, 64), np.float32)},
                              sequence=SequenceStep(1, start=i == 0, end=i == 2))
            assert (await stream.receive()).error is None
    await s.stop()

asyncio.run(go())
print(sorted(m for m in sys.modules
             if m == "torch" or m.startswith(("torch.", "mha.model", "mha.export"))))
"""


def test_decoding_never_imports_torch(seq_repo: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(seq_repo)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
