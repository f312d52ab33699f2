"""Every kind of bad input: the right code and message; the server keeps serving."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_helpers import RunningServer, random_inputs, settings_for

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.core.errors import INTERNAL_MESSAGE
from mha.service.grpc import codec

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
Mutation = Callable[[pb.ModelInferRequest], None]


def cross_request(typed: bool = False) -> pb.ModelInferRequest:
    """A valid request for the cross model (B=2, L=5, S=7): query, key, value, mask."""
    return codec.infer_request("cross", random_inputs("cross"), typed=typed, request_id="bad")


def tensor(request: pb.ModelInferRequest, name: str) -> pb.ModelInferRequest.InferInputTensor:
    return next(t for t in request.inputs if t.name == name)


def set_shape(name: str, shape: list[int]) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        del tensor(request, name).shape[:]
        tensor(request, name).shape.extend(shape)

    return mutate


def set_field(**fields: str) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        for key, value in fields.items():
            setattr(request, key, value)

    return mutate


def set_datatype(name: str, datatype: str) -> Mutation:
    return lambda request: setattr(tensor(request, name), "datatype", datatype)


def drop_input(name: str) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        index = [t.name for t in request.inputs].index(name)
        del request.inputs[index]
        del request.raw_input_contents[index]

    return mutate


def add_input(name: str, array: np.ndarray) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        header, raw = codec.input_tensor(name, array)
        request.inputs.append(header)
        request.raw_input_contents.append(raw)

    return mutate


def set_raw(name: str, data: bytes) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        index = [t.name for t in request.inputs].index(name)
        request.raw_input_contents[index] = data

    return mutate


def poke(name: str, index: tuple[int, ...], value: float) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        position = [t.name for t in request.inputs].index(name)
        header = request.inputs[position]
        array = codec.from_raw(request.raw_input_contents[position], "FP32", header.shape).copy()
        array[index] = value
        request.raw_input_contents[position] = codec.to_raw(array)

    return mutate


def outputs(*names: str) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        request.outputs.extend(
            pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names
        )

    return mutate


def typed(
    mutate_typed: Callable[[pb.ModelInferRequest], None],
) -> Callable[[], pb.ModelInferRequest]:
    def build() -> pb.ModelInferRequest:
        request = cross_request(typed=True)
        mutate_typed(request)
        return request

    return build


def mix_raw_and_typed(request: pb.ModelInferRequest) -> None:
    tensor(request, "query").contents.fp32_contents.extend([0.0] * (2 * 5 * 64))


def fp16_typed(request: pb.ModelInferRequest) -> None:
    tensor(request, "query").datatype = "FP16"


def wrong_typed_field(request: pb.ModelInferRequest) -> None:
    query = tensor(request, "query")
    query.contents.ClearField("fp32_contents")
    query.contents.int_contents.extend([0] * (2 * 5 * 64))


def short_typed(request: pb.ModelInferRequest) -> None:
    del tensor(request, "value").contents.fp32_contents[-1]


HUGE = 2**40
CASES: list[tuple[str, Mutation | Callable[[], pb.ModelInferRequest], grpc.StatusCode, str]] = [
    ("unknown-model", set_field(model_name="nope"), NOT_FOUND, "model 'nope' not found"),
    ("unknown-version", set_field(model_version="7"), NOT_FOUND,
     "model 'cross' has no version '7'; versions: 1"),
    ("non-numeric-version", set_field(model_version="latest"), NOT_FOUND, "no version 'latest'"),
    ("superscript-version", set_field(model_version="\u00b9"), NOT_FOUND, "no version '\u00b9'"),
    ("fullwidth-version", set_field(model_version="\uff11"), NOT_FOUND, "no version '\uff11'"),
    ("missing-input", drop_input("key"), INVALID, "missing input 'key' for model 'cross'"),
    ("unknown-input", add_input("bias", np.zeros((2, 5), np.float32)), INVALID,
     "unknown input 'bias' for model 'cross'; expected: query, key, value, key_padding_mask"),
    ("duplicate-input", add_input("query", np.zeros((2, 5, 64), np.float32)), INVALID,
     "input 'query' appears more than once"),
    ("unknown-datatype", set_datatype("query", "FP33"), INVALID,
     "input 'query': unknown datatype 'FP33'; expected FP32"),
    ("wrong-datatype", set_datatype("key", "FP16"), INVALID,
     "input 'key': datatype FP16, the model expects FP32"),
    ("wrong-mask-datatype", set_datatype("key_padding_mask", "INT32"), INVALID,
     "input 'key_padding_mask': datatype INT32, the model expects BOOL"),
    ("wrong-rank", set_shape("query", [2, 5, 64, 1]), INVALID,
     "input 'query': rank 4 (shape [2, 5, 64, 1]), expected rank 3 [-1, -1, 64]"),
    ("wrong-d-model", set_shape("query", [2, 10, 32]), INVALID,
     "input 'query': dimension 2 is 32, expected 64 (d_model)"),
    ("wrong-kdim", set_shape("key", [2, 14, 32]), INVALID,
     "input 'key': dimension 2 is 32, expected 64 (kdim)"),
    ("negative-dim", set_shape("query", [2, -5, 64]), INVALID,
     "input 'query': dimension 1 is negative ([2, -5, 64])"),
    ("zero-dim", set_shape("query", [0, 5, 64]), INVALID,
     "input 'query': dimension 0 is zero ([0, 5, 64])"),
    ("overflowing-shape", set_shape("query", [HUGE, HUGE, 64]), EXHAUSTED,
     f"input 'query': shape [{HUGE}, {HUGE}, 64] is {HUGE * HUGE * 64 * 4} bytes, over the "
     f"limit of {64 * 2**20} bytes"),
    ("batch-over-limit", set_shape("query", [65, 5, 64]), EXHAUSTED,
     "input 'query': batch size 65 is over the limit of 64"),
    ("sequence-over-limit", set_shape("key", [2, 4097, 64]), EXHAUSTED,
     "input 'key': sequence length 4097 is over the limit of 4096"),
    ("raw-length", set_raw("value", b"\0" * 12), INVALID,
     "input 'value': raw contents are 12 bytes, shape [2, 7, 64] of FP32 needs 3584"),
    ("raw-count", lambda r: r.raw_input_contents.pop(), INVALID,
     "raw_input_contents has 3 entries, expected one per input (4 inputs)"),
    ("raw-and-typed", mix_raw_and_typed, INVALID,
     "input 'query' has typed contents while the request also has raw_input_contents"),
    ("batch-mismatch", set_shape("key", [3, 7, 64]), INVALID,
     "input 'key': batch size 3 does not match query's 2"),
    ("value-length-mismatch", set_shape("value", [2, 6, 64]), INVALID,
     "input 'value': sequence length 6 does not match key's 7"),
    ("mask-length-mismatch", set_shape("key_padding_mask", [2, 5]), INVALID,
     "input 'key_padding_mask': sequence length 5 does not match key's 7"),
    ("unknown-output", outputs("scores"), INVALID,
     "requested output 'scores' does not exist in model 'cross'; it has: output, "
     "attention_weights"),
    ("duplicate-output", outputs("output", "output"), INVALID,
     "output 'output' requested more than once"),
    ("nan", poke("query", (1, 2, 3), float("nan")), INVALID,
     "input 'query': holds NaN or Inf (first at index [1, 2, 3]); inputs must be finite"),
    ("inf", poke("value", (0, 6, 63), float("-inf")), INVALID,
     "input 'value': holds NaN or Inf (first at index [0, 6, 63])"),
    ("bool-byte", set_raw("key_padding_mask", b"\x02" * 14), INVALID,
     "input 'key_padding_mask': BOOL bytes must be 0 or 1"),
    ("typed-fp16", typed(fp16_typed), INVALID,
     "input 'query': datatype FP16, the model expects FP32"),
    ("typed-wrong-field", typed(wrong_typed_field), INVALID,
     "input 'query': typed contents in int_contents, expected fp32_contents for FP32"),
    ("typed-count", typed(short_typed), INVALID,
     "input 'value': fp32_contents holds 895 values, shape [2, 7, 64] needs 896"),
]  # fmt: skip


def build(mutation: Mutation | Callable[[], pb.ModelInferRequest]) -> pb.ModelInferRequest:
    if getattr(mutation, "__name__", "") == "build":
        return mutation()  # type: ignore[call-arg]
    request = cross_request()
    mutation(request)  # type: ignore[call-arg]
    return request


@pytest.mark.parametrize(("mutation", "code", "message"),
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])  # fmt: skip
def test_bad_request_is_refused_and_server_keeps_serving(running: RunningServer, mutation, code,
                                                         message):  # fmt: skip
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.ModelInfer(build(mutation))
    assert caught.value.code() == code
    assert message in caught.value.details()
    good = running.stub.ModelInfer(cross_request())
    assert good.outputs[0].shape == [2, 5, 64]


def test_self_model_has_no_attention_weights(running: RunningServer):
    request = codec.infer_request("self", random_inputs("self"), ["attention_weights"])
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.ModelInfer(request)
    assert caught.value.code() == INVALID
    assert caught.value.details() == (
        "requested output 'attention_weights' does not exist in model 'self'; it has: output"
    )


def test_self_model_mask_must_match_query_length(running: RunningServer):
    inputs = random_inputs("self")
    inputs["key_padding_mask"] = np.zeros((2, 4), bool)
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.ModelInfer(codec.infer_request("self", inputs))
    assert caught.value.details() == (
        "input 'key_padding_mask': sequence length 4 does not match query's 5"
    )


@pytest.fixture(scope="module")
def small_limits(repository: Path) -> Iterator[RunningServer]:
    """A server with a 1 MiB message limit and a sequence limit of 16, set by settings."""
    server = RunningServer(
        settings_for(repository, max_message_bytes=2**20, max_sequence_length=16)
    ).load()
    yield server
    server.close()


def test_message_over_the_size_limit(small_limits: RunningServer):
    inputs = {"query": np.zeros((1, 16, 64 * 300), np.float32)}  # ~1.2 MB on the wire
    with pytest.raises(grpc.RpcError) as caught:
        small_limits.stub.ModelInfer(codec.infer_request("self", inputs))
    assert caught.value.code() == EXHAUSTED
    assert "larger than max" in caught.value.details()
    assert small_limits.stub.ModelInfer(codec.infer_request("self", random_inputs("self")))


def test_sequence_limit_from_settings(small_limits: RunningServer):
    inputs = random_inputs("self", length=17)
    with pytest.raises(grpc.RpcError) as caught:
        small_limits.stub.ModelInfer(codec.infer_request("self", inputs))
    assert caught.value.code() == EXHAUSTED
    assert caught.value.details() == ("input 'query': sequence length 17 is over the limit of 16")


class Explodes:
    """A runner in front of ORT that fails unexpectedly on a marked request (query[0,0,0]=42)."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, feeds, outputs):
        if feeds["query"][0, 0, 0] == 42.0:
            raise RuntimeError("secret internal detail")
        return self.runner(feeds, outputs)


def test_unexpected_error_is_internal_with_a_fixed_message(repository: Path, caplog):
    server = RunningServer(settings_for(repository), wrap_runner=Explodes).load()
    try:
        inputs = random_inputs("self")
        inputs["query"][0, 0, 0] = 42.0
        request = codec.infer_request("self", inputs, request_id="boom-1")
        with (
            caplog.at_level(logging.ERROR, logger="mha.service.grpc.servicer"),
            pytest.raises(grpc.RpcError) as caught,
        ):
            server.stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == f"{INTERNAL_MESSAGE}: boom-1"
        [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert record.request_id == "boom-1"  # type: ignore[attr-defined]
        assert "secret internal detail" in caplog.text  # the traceback is in the log only
        assert server.stub.ModelInfer(codec.infer_request("self", random_inputs("self")))
    finally:
        server.close()
