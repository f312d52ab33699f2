"""Hypothesis strategies of the fuzz tests: what a careless or hostile client may send.

One definition for the short test (tests/service/test_fuzz.py) and the long run
(tests/service/fuzz_long.py, `make fuzz`). Requests come in three kinds: near-valid ones (a
correct request for a served model, then a few mutations), wild ones (every field random)
and raw bytes sent as the whole message. Declared shapes may be huge (2**62); the bytes
actually sent stay small (RAW_CAP per tensor, TYPED_CAP typed values), so no example makes
either side allocate much.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fuzz_values import (
    DATATYPES,
    DIMS,
    FLAGS,
    HEALTH_CHECK,
    IDS,
    INPUT_NAMES,
    KINDS,
    LENGTHS,
    MODEL_NAMES,
    MODELS,
    OUTPUT_NAMES,
    PARAMETER_NAMES,
    PARAMETERS,
    POISON,
    REFLECTION,
    RPCS,
    SEQUENCE_IDS,
    SEQUENCE_KINDS,
    SHAPES,
    VERSIONS,
    Call,
    E,
    Sent,
    Stream,
    Unary,
    data_bytes,
    fill_typed,
    parameter_values,
    raw_entry,
    sent,
    typed_values,
)
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from mha.proto import grpc_predict_v2_pb2 as pb

# --- mutations of a near-valid request ---

Mutation = Callable[[st.DrawFn, pb.ModelInferRequest], None]


def _pick(draw: st.DrawFn, items: Sequence[Any]) -> int | None:
    return draw(st.integers(0, len(items) - 1)) if len(items) else None


def m_model_name(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    request.model_name = draw(MODEL_NAMES)


def m_version(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    request.model_version = draw(VERSIONS)


def m_id(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    request.id = draw(IDS)


def m_drop_input(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if (i := _pick(draw, request.inputs)) is not None:
        del request.inputs[i]
        if i < len(request.raw_input_contents):
            del request.raw_input_contents[i]


def m_duplicate_input(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if (i := _pick(draw, request.inputs)) is not None:
        request.inputs.add().CopyFrom(request.inputs[i])
        if i < len(request.raw_input_contents):
            request.raw_input_contents.append(request.raw_input_contents[i])


def m_rename_input(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if (i := _pick(draw, request.inputs)) is not None:
        request.inputs[i].name = draw(INPUT_NAMES)


def m_datatype(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if (i := _pick(draw, request.inputs)) is not None:
        request.inputs[i].datatype = draw(DATATYPES)


def m_shape(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """Set, add or remove one dimension (to 0, -1, 2**62, ...) of one input's header only."""
    if (i := _pick(draw, request.inputs)) is None:
        return
    shape = request.inputs[i].shape
    op = draw(st.sampled_from(["set", "set", "append", "pop", "clear"]))
    if op == "set" and (d := _pick(draw, shape)) is not None:
        shape[d] = draw(DIMS)
    elif op == "append":
        shape.append(draw(DIMS))
    elif op == "pop" and len(shape):
        del shape[-1]
    elif op == "clear":
        del shape[:]


def m_raw_bytes(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """One raw entry a byte longer or shorter, empty, doubled or random."""
    if (i := _pick(draw, request.raw_input_contents)) is None:
        return
    data = request.raw_input_contents[i]
    edits = [data + b"\x00", data[:-1], b"", data + data, data[: len(data) // 2]]
    request.raw_input_contents[i] = draw(st.sampled_from(edits) | st.binary(max_size=64))


def m_raw_count(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if draw(st.booleans()) or not request.raw_input_contents:
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    else:
        del request.raw_input_contents[-1]


def m_typed(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """Typed contents on one input: alongside raw contents, or instead of them."""
    if (i := _pick(draw, request.inputs)) is None:
        return
    if draw(st.booleans()):
        del request.raw_input_contents[:]
    request.inputs[i].contents.Clear()
    fill_typed(draw, request.inputs[i], draw(st.integers(0, 2**16)))


def m_poison(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """One element of a float or bool input set to NaN, Inf, a huge value or a bad bool byte."""
    if (i := _pick(draw, request.inputs)) is None:
        return
    tensor = request.inputs[i]
    value = draw(st.sampled_from(POISON))
    if tensor.contents.fp32_contents:
        values = tensor.contents.fp32_contents
        values[draw(st.integers(0, len(values) - 1))] = value
    elif i < len(request.raw_input_contents) and tensor.datatype in ("FP32", "FP16", "BOOL"):
        dtype = {"FP32": np.float32, "FP16": np.float16, "BOOL": np.uint8}[tensor.datatype]
        raw = request.raw_input_contents[i]
        array = np.frombuffer(raw[: len(raw) // dtype().itemsize * dtype().itemsize], dtype)
        if array.size:
            array = array.copy()
            bad = draw(st.sampled_from([2, 255])) if dtype is np.uint8 else value
            with np.errstate(over="ignore"):
                array[draw(st.integers(0, array.size - 1))] = bad
            request.raw_input_contents[i] = array.tobytes() + raw[array.nbytes :]


def m_parameters(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """Random parameters on the request, one input or one requested output."""
    where = draw(st.sampled_from(["request", "input", "output"]))
    target = request.parameters
    if where == "input" and (i := _pick(draw, request.inputs)) is not None:
        target = request.inputs[i].parameters
    elif where == "output" and (o := _pick(draw, request.outputs)) is not None:
        target = request.outputs[o].parameters
    for name, value in draw(PARAMETERS).items():
        target[name].CopyFrom(value)


def m_outputs(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    for name in draw(st.lists(OUTPUT_NAMES, min_size=1, max_size=3)):
        request.outputs.add(name=name)


def m_sequence(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """sequence_id / sequence_start / sequence_end with odd kinds and values, or removed."""
    name = draw(st.sampled_from(["sequence_id", "sequence_start", "sequence_end"]))
    if draw(st.integers(0, 3)) == 0:
        request.parameters.pop(name, None)
    else:
        request.parameters[name].CopyFrom(draw(SEQUENCE_IDS if name == "sequence_id" else FLAGS))


MUTATIONS: tuple[Mutation, ...] = (
    m_model_name, m_version, m_id, m_drop_input, m_duplicate_input, m_rename_input, m_datatype,
    m_shape, m_shape, m_raw_bytes, m_raw_count, m_typed, m_poison, m_poison, m_parameters,
    m_outputs, m_sequence, m_sequence,
)  # fmt: skip

# Half the near-valid requests go out unchanged, so the fuzz reaches the models too.
MUTATION_LISTS = st.one_of(
    st.just([]), st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)
)


# --- requests ---


def _valid_shapes(draw: st.DrawFn, model: str) -> tuple[dict[str, list[int]], bool | None]:
    """Input name -> shape of a correct request, and whether a memory model's request starts."""
    kind = KINDS[model][0]
    batch = 1 if kind in SEQUENCE_KINDS else draw(st.integers(1, 3))
    length, source = draw(LENGTHS), draw(LENGTHS)
    shapes = {"query": [batch, length, E]}
    start = draw(st.booleans()) if kind == "memory" else None
    if kind == "cross" or start:
        shapes["key"] = [batch, source, E]
        shapes["value"] = [batch, source, E]
        if draw(st.booleans()):
            shapes["key_padding_mask"] = [batch, source]
    elif kind == "self" and draw(st.booleans()):
        shapes["key_padding_mask"] = [batch, length]
    return shapes, start


@st.composite
def near_valid_requests(
    draw: st.DrawFn, models: Sequence[str] = tuple(sorted(MODELS))
) -> pb.ModelInferRequest:
    """A correct request for a served model (sequence parameters for sequence models), then
    up to three mutations."""
    model = draw(st.sampled_from(models))
    kind, datatype = KINDS[model]
    shapes, start = _valid_shapes(draw, model)
    typed = datatype == "FP32" and draw(st.integers(0, 3)) == 0
    seed = draw(st.integers(0, 2**16))
    request = pb.ModelInferRequest(model_name=model, id=draw(IDS))
    for n, (name, shape) in enumerate(shapes.items()):
        dt = "BOOL" if name == "key_padding_mask" else datatype
        tensor = request.inputs.add(name=name, datatype=dt, shape=shape)
        if typed:
            field = "bool_contents" if dt == "BOOL" else "fp32_contents"
            getattr(tensor.contents, field).extend(typed_values(draw, field, math.prod(shape), n))
        else:
            request.raw_input_contents.append(data_bytes(dt, math.prod(shape), seed + n))
    if kind in SEQUENCE_KINDS:
        request.parameters["sequence_id"].CopyFrom(draw(SEQUENCE_IDS))
        first = draw(st.booleans()) if start is None else start
        request.parameters["sequence_start"].bool_param = first
        request.parameters["sequence_end"].bool_param = draw(st.booleans())
    outputs = [(), (), ("output",)]
    if model == "cross":
        outputs += [("attention_weights",), ("output", "attention_weights")]
    outputs = draw(st.sampled_from(outputs))
    request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs)
    for mutation in draw(MUTATION_LISTS):
        mutation(draw, request)
    return request


@st.composite
def wild_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Every field random: names, datatypes, shapes, raw and typed contents, parameters."""
    request = pb.ModelInferRequest(
        model_name=draw(MODEL_NAMES), model_version=draw(VERSIONS), id=draw(IDS)
    )
    for n in range(draw(st.integers(0, 4))):
        tensor = request.inputs.add(
            name=draw(INPUT_NAMES), datatype=draw(DATATYPES), shape=draw(SHAPES)
        )
        for name, value in draw(
            st.dictionaries(PARAMETER_NAMES, parameter_values(), max_size=1)
        ).items():
            tensor.parameters[name].CopyFrom(value)
        contents = draw(st.sampled_from(["raw", "raw", "typed", "both", "none"]))
        if contents in ("raw", "both"):
            request.raw_input_contents.append(raw_entry(draw, tensor.datatype, tensor.shape, n))
        if contents in ("typed", "both"):
            fill_typed(draw, tensor, n)
    for name, value in draw(PARAMETERS).items():
        request.parameters[name].CopyFrom(value)
    for name in draw(st.lists(OUTPUT_NAMES, max_size=3)):
        request.outputs.add(name=name)
    if draw(st.integers(0, 4)) == 0:
        m_raw_count(draw, request)
    return request


INFER_REQUESTS = st.one_of(near_valid_requests(), near_valid_requests(), wild_requests())


# --- raw bytes ---


@st.composite
def mutated_bytes(draw: st.DrawFn, messages: st.SearchStrategy[Message]) -> bytes:
    """A serialized message with one to three byte-level edits: truncated, flipped, spliced."""
    data = bytearray(draw(messages).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "repeat"]))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "repeat":
            data[at:at] = data[max(0, at - 16) : at]
    return bytes(data)


# Hand-made wire breakage: invalid UTF-8 in a string, truncated or overlong varints, a
# length past the end, group wire types, field number 0, and valid messages with unknown fields.
CRAFTED = (
    b"\x0a\x01\xff", b"\x0a\x04self\x12\x02\xc3\x28", b"\x08", b"\xff" * 11, b"\x0e", b"\x0f",
    b"\x0b\x0c", b"\x0c", b"\x00\x00", b"\x0a\xff\xff\xff\xff\x0f", b"\x2a\x80\x80\x80\x80\x08",
    b"\x3a\x80\x80\x80\x80\x08\x00", b"\x0a\x04self\xf8\xff\xff\xff\x0f\x01",
    b"\x0a\x04self\xa2\x06\x00", b"\x2a\x06\x0a\x04\xed\xa0\x80\x00",
    b"\x22\x0c\x0a\x0bsequence_id", b"\x22\x06\x0a\x00\x12\x02\x08\x02",
)  # fmt: skip
GARBAGE = st.one_of(
    st.binary(max_size=200),
    mutated_bytes(near_valid_requests()),
    mutated_bytes(wild_requests()),
    st.sampled_from(CRAFTED),
)


def raw(data: bytes) -> Sent:
    return Sent(data)


def model_refs(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(lambda n, v: cls(name=n, version=v), MODEL_NAMES, VERSIONS)


# --- calls: what the tests and the long run draw ---


def infer_calls() -> st.SearchStrategy[Unary]:
    """Structured ModelInfer requests: near-valid and wild."""
    return st.builds(lambda m: Unary("ModelInfer", sent(m)), INFER_REQUESTS)


def sequence_calls() -> st.SearchStrategy[Unary]:
    """Near-valid unary steps of the sequence models: the ids of a small pool meet."""
    return st.builds(lambda m: Unary("ModelInfer", sent(m)), near_valid_requests(("kv", "xkv")))


def garbage_calls() -> st.SearchStrategy[Unary]:
    """Raw bytes as the whole message of any unary RPC; random names on the model RPCs and
    the health check."""
    named = {
        "ModelMetadata": pb.ModelMetadataRequest,
        "ModelReady": pb.ModelReadyRequest,
        "ModelStatistics": pb.ModelStatisticsRequest,
    }
    services = st.one_of(
        st.sampled_from(["", "inference.GRPCInferenceService", "liveness"]), st.text(max_size=30)
    )
    health = services.map(lambda s: sent(health_pb2.HealthCheckRequest(service=s)))
    return st.one_of(
        st.builds(Unary, st.sampled_from(RPCS), st.builds(raw, GARBAGE)),
        st.builds(Unary, st.just("ModelInfer"), st.builds(raw, GARBAGE)),
        *(st.builds(Unary, st.just(rpc), model_refs(cls).map(sent)) for rpc, cls in named.items()),
        st.builds(Unary, st.just(HEALTH_CHECK), health),
    )


SYMBOLS = st.one_of(
    st.sampled_from(["inference.GRPCInferenceService", "inference.ModelInferRequest",
                     "grpc.health.v1.Health", "grpc_predict_v2.proto", ""]),
    st.text(max_size=30),
)  # fmt: skip
REFLECTION_REQUESTS = st.one_of(
    *(
        SYMBOLS.map(lambda s, f=kind: sent(reflection_pb2.ServerReflectionRequest(**{f: s})))
        for kind in ("file_containing_symbol", "file_by_filename", "list_services",
                     "all_extension_numbers_of_type")
    )
)  # fmt: skip


def reflection_calls() -> st.SearchStrategy[Stream]:
    """Server reflection streams (what grpcurl opens) with random symbols and garbage."""
    items = st.lists(REFLECTION_REQUESTS | GARBAGE.map(raw), min_size=1, max_size=4)
    return st.builds(Stream, items.map(tuple), st.none(), st.just(REFLECTION))


STREAM_ITEMS = st.one_of(
    near_valid_requests(("kv", "xkv")).map(sent),
    near_valid_requests(("kv", "xkv")).map(sent),
    near_valid_requests().map(sent),
    wild_requests().map(sent),
    GARBAGE.map(raw),
)


def stream_calls() -> st.SearchStrategy[Stream]:
    """ModelStreamInfer streams of one to six requests: sequence steps, wild ones, garbage;
    now and then the client cancels the stream midway."""
    items = st.lists(STREAM_ITEMS, min_size=1, max_size=6).map(tuple)
    cancel_after = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 3))
    return st.builds(Stream, items, cancel_after)


def calls() -> st.SearchStrategy[Call]:
    """Any of the above (the long run)."""
    return st.one_of(
        infer_calls(), sequence_calls(), garbage_calls(), stream_calls(), reflection_calls()
    )
