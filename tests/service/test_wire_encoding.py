"""ModelInfer's bytes without protobuf's copies (mha.service.grpc.wire) against protobuf itself.

The split request must be what protobuf parses, field for field, and refuse what protobuf
refuses; the written response must be the bytes protobuf writes for the same message.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.grpc import codec, wire

FAST = {"derandomize": True, "database": None, "deadline": None, "max_examples": 300}

texts = st.text(max_size=12)
params = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.one_of(st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1), st.text(max_size=8)),
    max_size=3,
)


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A ModelInferRequest of any shape of content: raw, typed, none, extra raw entries."""
    message = pb.ModelInferRequest(
        model_name=draw(texts), model_version=draw(texts), id=draw(texts)
    )
    for key, value in draw(params).items():
        codec.set_parameter(message.parameters[key], value)
    for _ in range(draw(st.integers(0, 3))):
        tensor = message.inputs.add(
            name=draw(texts), datatype=draw(st.sampled_from(["FP32", "BOOL"]))
        )
        tensor.shape.extend(draw(st.lists(st.integers(-5, 1 << 40), max_size=4)))
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
    for name in draw(st.lists(texts, max_size=2)):
        message.outputs.add(name=name)
    for content in draw(st.lists(st.binary(max_size=300), max_size=4)):
        message.raw_input_contents.append(content)
    return message


def protobuf_split(raw: bytes) -> tuple[pb.ModelInferRequest, list[bytes]]:
    message = pb.ModelInferRequest.FromString(raw)
    contents = list(message.raw_input_contents)
    message.ClearField("raw_input_contents")
    return message, contents


def assert_same_split(raw: bytes) -> None:
    """split_infer_request(raw) is protobuf's parse, or both refuse it."""
    try:
        expected = protobuf_split(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            wire.split_infer_request(raw)
        return
    split = wire.split_infer_request(raw)
    header, contents = split.message, split.contents
    assert header == expected[0]
    assert [bytes(c) for c in contents] == expected[1]


@settings(**FAST)
@given(requests())
def test_split_request_is_protobufs_parse(message: pb.ModelInferRequest) -> None:
    assert_same_split(message.SerializeToString())


@settings(**FAST)
@given(requests(), st.data())
def test_split_refuses_what_protobuf_refuses(message: pb.ModelInferRequest, data) -> None:
    raw = bytearray(message.SerializeToString())
    for _ in range(data.draw(st.integers(1, 3))):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=6))
    assert_same_split(bytes(raw))


def test_contents_are_views_of_the_received_bytes() -> None:
    query = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    raw = codec.infer_request("m", {"query": query}).SerializeToString()
    contents = wire.split_infer_request(raw).contents
    assert isinstance(contents[0], memoryview) and contents[0].obj is raw
    assert np.array_equal(np.frombuffer(contents[0], np.float32).reshape(2, 3, 4), query)


def test_fields_in_any_order() -> None:
    """Raw entries before the inputs, fields repeated: protobuf's last-one-wins kept."""
    parts = [
        pb.ModelInferRequest(raw_input_contents=[b"ab"]),
        pb.ModelInferRequest(model_name="first", id="x"),
        pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(name="q")]),
        pb.ModelInferRequest(raw_input_contents=[b"", b"cd"], model_name="second"),
    ]
    raw = b"".join(p.SerializeToString() for p in parts)
    split = wire.split_infer_request(raw)
    header, contents = split.message, split.contents
    assert header.model_name == "second" and header.id == "x"
    assert [bytes(c) for c in contents] == [b"ab", b"", b"cd"]
    assert_same_split(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # an empty message is a valid one
        b"\x3a\x05abc",  # field 7 longer than the message
        b"\x3b\x3c",  # field 7 as a group
        b"\xba\x80\x80\x80\x80\x00\x01x",  # field 7 under a six-byte tag
        b"\x0a\x02ab\x3a\x01z\x07",  # wire type 7 after good fields
        b"\x3a" + b"\xff" * 11,  # a length of more than ten bytes
    ],
)
def test_odd_bytes_get_protobufs_verdict(raw: bytes) -> None:
    assert_same_split(raw)


arrays = st.one_of(
    st.builds(
        lambda shape, seed: np.random.default_rng(seed).standard_normal(shape).astype(np.float32),
        st.lists(st.integers(0, 4), max_size=3), st.integers(0, 9),
    ),
    st.builds(
        lambda shape, seed: np.random.default_rng(seed).standard_normal(shape).astype(np.float16),
        st.lists(st.integers(0, 4), max_size=3), st.integers(0, 9),
    ),
    st.builds(
        lambda shape, seed: np.random.default_rng(seed).random(shape) > 0.5,
        st.lists(st.integers(0, 4), max_size=3), st.integers(0, 9),
    ),
    st.builds(  # not contiguous: a padded batch's slice
        lambda seed: np.random.default_rng(seed).random((3, 6, 4), np.float32)[:, 1:4],
        st.integers(0, 9),
    ),
)  # fmt: skip


@settings(**FAST)
@given(texts, texts, texts, st.dictionaries(texts, arrays, max_size=3), params)
def test_response_is_protobufs_bytes(model, version, request_id, outputs, parameters) -> None:
    written = wire.infer_response(model, version, request_id, outputs, parameters)
    message = codec.infer_response(model, version, request_id, outputs)
    for key, value in parameters.items():
        codec.set_parameter(message.parameters[key], value)
    assert pb.ModelInferResponse.FromString(written) == message
    if len(parameters) <= 1:  # a map's order on the wire is protobuf's own choice
        assert written == message.SerializeToString()


@settings(**FAST)
@given(texts, texts, texts, st.dictionaries(texts, arrays, max_size=3), params)
def test_stream_answer_is_protobufs_bytes(model, version, request_id, outputs, parameters):
    written = wire.infer_response(model, version, request_id, outputs, parameters, streamed=True)
    message = codec.infer_response(model, version, request_id, outputs)
    for key, value in parameters.items():
        codec.set_parameter(message.parameters[key], value)
    answer = pb.ModelStreamInferResponse(infer_response=message)
    assert pb.ModelStreamInferResponse.FromString(written) == answer
    if len(parameters) <= 1:
        assert written == answer.SerializeToString()


def test_response_parameter_out_of_int64_range_is_refused() -> None:
    with pytest.raises(ValueError, match="int64"):
        wire.infer_response("m", "1", "", {}, {"big": 1 << 63})


def test_remembered_parts_keep_types_and_stay_bounded() -> None:
    """The encoder remembers repeating parts: False and 0 (equal as dict keys) stay apart,
    and past its limit the memory starts over without changing an answer."""
    for value in (False, 0, True, 1, "0"):
        message = codec.infer_response("m", "1", "", {})
        codec.set_parameter(message.parameters["p"], value)
        assert wire.infer_response("m", "1", "", {}, {"p": value}) == message.SerializeToString()
    for length in range(wire._Memo.LIMIT + 10):
        outputs = {"output": np.zeros((1, length % 300, 2), np.float32)}
        written = wire.infer_response(f"m{length}", "1", "", outputs)
        assert written == codec.infer_response(f"m{length}", "1", "", outputs).SerializeToString()
    assert len(wire._names) <= wire._Memo.LIMIT
