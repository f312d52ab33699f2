"""Values of the fuzz tests: the models, the protocol's names, what a call sends (with a
readable repr for falsifying examples), and strategies for every field and for tensor data
(declared shapes may be huge; the bytes built stay under RAW_CAP and TYPED_CAP).
fuzz_strategies builds whole requests and calls from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message
from hypothesis import strategies as st

from mha.proto import grpc_predict_v2_pb2 as pb

E = 64  # d_model of the test exports
# Model name -> ExportOptions fields (d_model 64, 4 heads); the first three equal entries of
# service_helpers.MODELS and test_sequences.MODELS, so a full test run exports them once.
MODELS: dict[str, dict[str, Any]] = {
    "self": {"target": "ort"},
    "cross": {"target": "ort", "self_attention": False, "attention_weights": True},
    "self_fp16": {"target": "ort", "dtype": "fp16"},
    "kv": {"target": "ort", "kv_cache": True},
    "xkv": {"target": "ort", "kv_cache": True, "self_attention": False},
}
# Model name -> (what its requests carry, its float datatype)
KINDS = {
    "self": ("self", "FP32"),
    "cross": ("cross", "FP32"),
    "self_fp16": ("self", "FP16"),
    "kv": ("kv", "FP32"),
    "xkv": ("memory", "FP32"),
}
SEQUENCE_KINDS = ("kv", "memory")
RAW_CAP = 64 * 1024  # largest raw entry built to the declared size; beyond it: a few bytes
TYPED_CAP = 4096  # largest typed contents built to the declared size

HEALTH_CHECK = "grpc.health.v1.Health/Check"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
STREAM_INFER = "ModelStreamInfer"
# Unary methods: GRPCInferenceService's by name, the others as "<service>/<method>".
RPCS = (
    "ModelInfer", "ModelMetadata", "ModelReady", "ServerMetadata", "ModelStatistics",
    "ServerLive", "ServerReady", HEALTH_CHECK,
)  # fmt: skip
KSERVE_DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
)  # fmt: skip
ITEMSIZE = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}  # fmt: skip
TYPED_FIELDS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
    "fp32_contents", "fp64_contents", "bytes_contents",
)  # fmt: skip
INT64 = (-(2**63), 2**63 - 1)
POISON = (float("nan"), float("inf"), float("-inf"), 3.4e38, 1e-45, -0.0, 65520.0, 1e6)


# --- fields ---

MODEL_NAMES = st.one_of(
    st.sampled_from(sorted(MODELS)),
    st.sampled_from(sorted(MODELS)),
    st.sampled_from(["", "SELF", "self ", " self", "self/1", "../self", "self\x00", "nope", "m0"]),
    st.text(max_size=20),
)
VERSIONS = st.one_of(
    st.sampled_from(["", "1"]),
    st.sampled_from(["0", "2", "-1", "01", "+1", " 1", "1 ", "1.0", "latest", "9" * 30]),
    # digits to str.isdigit() that int() reads as 1 (fullwidth, Arabic-Indic) or not at all
    st.sampled_from(["\uff11", "\u0661", "\u00b9", "\u2460"]),
    st.text(max_size=8),
)
IDS = st.one_of(st.just(""), st.text(max_size=24), st.sampled_from(["\x00", "x" * 2000]))
INPUT_NAMES = st.one_of(
    st.sampled_from(["query", "key", "value", "key_padding_mask"]),
    st.sampled_from(["past_key", "past_value", "memory_key", "output", "Query", "query\x00", ""]),
    st.text(max_size=12),
)
OUTPUT_NAMES = st.one_of(
    st.sampled_from(["output", "attention_weights"]),
    st.sampled_from(["present_key", "new_key", "query", "OUTPUT", ""]),
    st.text(max_size=12),
)
DATATYPES = st.one_of(
    st.sampled_from(KSERVE_DATATYPES),
    st.sampled_from(["", "fp32", "FP 32", "FP32\x00", "float32", "TYPE_FP32", "FP8", "INT4"]),
    st.text(max_size=8),
)
HUGE_DIMS = (2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63))
DIMS = st.one_of(
    st.integers(1, 6),
    st.sampled_from((0, -1, 63, 64, 65, 4096, 4097, *HUGE_DIMS)),
    st.integers(*INT64),
)
SHAPES = st.lists(DIMS, max_size=5)
LENGTHS = st.one_of(st.integers(1, 6), st.integers(1, 6), st.sampled_from([16, 17, 33, 64, 65]))


def parameter_values() -> st.SearchStrategy[pb.InferParameter]:
    """Every InferParameter kind (and none), with their edge values."""
    param = pb.InferParameter
    return st.one_of(
        st.builds(lambda v: param(bool_param=v), st.booleans()),
        st.builds(
            lambda v: param(int64_param=v),
            st.one_of(st.sampled_from([0, -1, *INT64]), st.integers(*INT64)),
        ),
        st.builds(lambda v: param(string_param=v), st.text(max_size=16)),
        st.builds(lambda v: param(double_param=v), st.floats()),
        st.builds(lambda v: param(uint64_param=v), st.integers(0, 2**64 - 1)),
        st.just(param()),
    )


PARAMETER_NAMES = st.one_of(
    st.sampled_from(["sequence_id", "sequence_start", "sequence_end"]),
    st.sampled_from(["priority", "timeout", "binary_data_output", "provider", "classification"]),
    st.text(max_size=10),
)
PARAMETERS = st.dictionaries(PARAMETER_NAMES, parameter_values(), max_size=4)
POOL_IDS = st.sampled_from(  # a few ids, so requests of one sequence meet
    [pb.InferParameter(int64_param=i) for i in (1, 2, 3)]
    + [pb.InferParameter(string_param=s) for s in ("a", "b")]
)
SEQUENCE_IDS = st.one_of(
    POOL_IDS,
    POOL_IDS,
    POOL_IDS,
    st.sampled_from([
        pb.InferParameter(int64_param=0), pb.InferParameter(int64_param=-1),
        pb.InferParameter(int64_param=INT64[0]), pb.InferParameter(int64_param=INT64[1]),
        pb.InferParameter(uint64_param=2**64 - 1), pb.InferParameter(uint64_param=1),
        pb.InferParameter(string_param=""), pb.InferParameter(string_param="\x00"),
        pb.InferParameter(string_param="s" * 300), pb.InferParameter(double_param=1.0),
        pb.InferParameter(bool_param=True), pb.InferParameter(),
    ]),
    parameter_values(),
)  # fmt: skip
FLAGS = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    parameter_values(),
)


# --- tensor data ---


def element_count(shape: Sequence[int]) -> int:
    """Elements of a declared shape; -1 when a dimension is negative."""
    return -1 if any(d < 0 for d in shape) else math.prod(shape)


def data_bytes(datatype: str, count: int, seed: int) -> bytes:
    """`count` plausible elements of `datatype` as raw bytes (finite floats, 0/1 bools)."""
    rng = np.random.default_rng(seed)
    floats = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}
    if datatype in floats:
        return rng.standard_normal(count).astype(floats[datatype]).tobytes()
    if datatype == "BOOL":
        return (rng.random(count) < 0.3).astype(np.uint8).tobytes()
    return rng.bytes(count * ITEMSIZE.get(datatype, 4))


def raw_entry(draw: st.DrawFn, datatype: str, shape: Sequence[int], seed: int) -> bytes:
    """Raw contents of the right length, one byte off, empty or random bytes."""
    mode = draw(st.sampled_from(["right", "right", "right", "plus1", "minus1", "empty", "random"]))
    itemsize = ITEMSIZE.get(datatype, 4)
    need = element_count(shape) * itemsize
    if mode == "random" or need < 0 or need > RAW_CAP:
        return draw(st.binary(max_size=64))  # no buffer of the declared (maybe huge) size
    right = data_bytes(datatype, need // itemsize, seed)
    return {"right": right, "plus1": right + b"\x01", "minus1": right[:-1], "empty": b""}[mode]


INT_BOUNDS = {  # typed integer field -> numpy dtype and [low, high) of its values
    "int_contents": (np.int64, -(2**31), 2**31),
    "uint_contents": (np.int64, 0, 2**32),
    "int64_contents": (np.int64, *INT64),
    "uint64_contents": (np.uint64, 0, 2**64),
}


def typed_values(draw: st.DrawFn, field: str, count: int, seed: int) -> list[Any]:
    """`count` values (at most TYPED_CAP) for one typed contents field."""
    rng = np.random.default_rng(seed)
    count = min(max(count, 0), TYPED_CAP)
    if field == "fp32_contents":
        return rng.standard_normal(count).astype(np.float32).tolist()
    if field == "fp64_contents":
        return rng.standard_normal(count).tolist()
    if field == "bool_contents":
        return (rng.random(count) < 0.3).tolist()
    if field == "bytes_contents":
        return draw(st.lists(st.binary(max_size=8), min_size=min(count, 8), max_size=8))
    dtype, low, high = INT_BOUNDS[field]
    return rng.integers(low, high, size=count, dtype=dtype).tolist()


def fill_typed(draw: st.DrawFn, tensor: pb.ModelInferRequest.InferInputTensor, seed: int) -> None:
    """Typed contents in any field, of the declared element count, one off or empty."""
    field = draw(st.sampled_from(TYPED_FIELDS))
    count = element_count(tensor.shape)
    count += draw(st.sampled_from([0, 0, 0, 1, -1]))
    if draw(st.integers(0, 5)) == 0:
        count = 0
    getattr(tensor.contents, field).extend(typed_values(draw, field, count, seed))


# --- what is sent, with a readable repr for hypothesis' falsifying examples ---


@dataclass(frozen=True)
class Sent:
    """One message as it goes on the wire; `message` is what it was serialized from."""

    payload: bytes
    message: Message | None = None  # None: raw bytes, not built from a message

    def __repr__(self) -> str:
        return describe(self)


@dataclass(frozen=True)
class Unary:
    rpc: str  # one of RPCS
    sent: Sent

    def __repr__(self) -> str:
        return f"Unary({self.rpc}: {self.sent!r})"


@dataclass(frozen=True)
class Stream:
    items: tuple[Sent, ...]  # requests, in order; the client then half-closes
    cancel_after: int | None = None  # the client goes away after this many answers
    rpc: str = STREAM_INFER  # or REFLECTION

    def __repr__(self) -> str:
        items = "".join(f"  {item!r},\n" for item in self.items)
        return f"Stream({self.rpc}, cancel_after={self.cancel_after},\n{items})"


Call = Unary | Stream


def sent(message: Message) -> Sent:
    return Sent(message.SerializeToString(), message)


def describe(item: Sent) -> str:
    """One line: the message in text format with long data abbreviated, and short payloads."""
    hex_tail = f" payload={item.payload.hex()}" if len(item.payload) <= 256 else ""
    if item.message is None:
        shown = item.payload[:128].hex() + ("..." if len(item.payload) > 128 else "")
        return f"bytes[{len(item.payload)}] {shown}"
    copy = type(item.message)()
    copy.CopyFrom(item.message)
    notes = []
    if isinstance(copy, pb.ModelInferRequest):
        raws = [f"{len(r)}B:{r[:8].hex()}" for r in copy.raw_input_contents]
        del copy.raw_input_contents[:]
        if raws:
            notes.append(f"raw_input_contents=[{', '.join(raws)}]")
        for tensor in copy.inputs:
            for field, values in tensor.contents.ListFields():
                if len(values) > 4:
                    notes.append(f"{tensor.name!r}.{field.name}: {len(values)} values")
                    del values[4:]
    text = text_format.MessageToString(copy, as_one_line=True)
    text = re.sub(r"(.)\1{31,}", lambda m: f"{m[1] * 8}...({len(m[0])} times)", text)
    return f"{type(copy).__name__}[{len(item.payload)}B] {{{text}}} {' '.join(notes)}{hex_tail}"
