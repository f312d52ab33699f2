"""ModelInfer's tensor bytes on the wire without protobuf's copies.

A ModelInferRequest carries its tensors in raw_input_contents (field 7). Parsing the whole
message copies those bytes into protobuf's arena, and reading the field copies them again
into new bytes objects: two copies of every request's payload, 4 MB of fresh pages for one
(8,128) request. `split_infer_request` walks the message's top-level fields instead (a few
per request), parses everything but field 7 as usual, and hands back field 7's entries as
memoryviews into the received bytes.

The answer goes the other way: `infer_response` writes a ModelInferResponse's bytes
directly, each output's array joined in once, instead of copying it into an array's bytes,
then a message, then the serialized message. Its bytes are what protobuf would write for the
same message (tests/service/test_wire_encoding.py compares them). With
streamed=True it wraps the same bytes as a ModelStreamInferResponse, for ModelStreamInfer.

Anything the walk does not expect (a truncated field, a group, a length past the end) is
left to protobuf: the message is parsed whole and protobuf's own verdict stands, so what is
accepted and what is refused are exactly protobuf's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mha import contract
from mha.proto import grpc_predict_v2_pb2 as pb

RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents
_LEN = 2  # the length-delimited wire type
_UINT64 = (1 << 64) - 1


class _Unexpected(Exception):
    """The walk met something it leaves to protobuf."""


@dataclass(frozen=True, slots=True)
class SplitRequest:
    """A ModelInferRequest without raw_input_contents, and those entries in order."""

    message: pb.ModelInferRequest
    contents: Sequence[bytes | memoryview]

    @property
    def id(self) -> str:
        return self.message.id


def split_infer_request(raw: bytes) -> SplitRequest:
    """The request apart from its raw_input_contents, which are views of `raw`.

    Raises what ModelInferRequest.FromString raises for bytes that are not a message.
    """
    try:
        kept, contents = _walk(raw)
    except (_Unexpected, IndexError):
        message = pb.ModelInferRequest.FromString(raw)
        copied = list(message.raw_input_contents)
        message.ClearField("raw_input_contents")
        return SplitRequest(message, copied)
    return SplitRequest(pb.ModelInferRequest.FromString(b"".join(kept)), contents)


def _read_varint(raw: bytes, pos: int, most: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; _Unexpected past `most` bytes."""
    value = shift = 0
    for index in range(pos, pos + most):
        byte = raw[index]  # IndexError past the end: the caller's fallback
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    raise _Unexpected


def _walk(raw: bytes) -> tuple[list[memoryview], list[memoryview]]:
    """Top-level fields: every one but field 7 kept as it is, field 7's payloads apart."""
    view = memoryview(raw)
    end, pos, kept_from = len(raw), 0, 0
    kept: list[memoryview] = []
    contents: list[memoryview] = []
    while pos < end:
        start = pos
        tag, pos = _read_varint(raw, pos, 5)  # protobuf refuses longer tags
        wire_type = tag & 7
        if wire_type == _LEN:
            length, pos = _read_varint(raw, pos, 10)
            payload_end = pos + length  # past the end: caught below
            if tag >> 3 == RAW_INPUT_CONTENTS:
                if start > kept_from:
                    kept.append(view[kept_from:start])
                contents.append(view[pos:payload_end])
                kept_from = payload_end
            pos = payload_end
        elif wire_type == 0:
            _value, pos = _read_varint(raw, pos, 10)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise _Unexpected  # groups, or a wire type protobuf refuses
    if pos != end or not contents:
        raise _Unexpected  # past the end; or nothing to take apart
    if kept_from < end:
        kept.append(view[kept_from:end])
    return kept, contents


def _varint_bytes(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL[value]
    value &= _UINT64  # negative int64 values take ten bytes, two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((v,)) for v in range(0x80)]
_RAW_OUTPUT_TAG = _varint_bytes(6 << 3 | _LEN)  # ModelInferResponse.raw_output_contents
_STREAM_ANSWER_TAG = _varint_bytes(2 << 3 | _LEN)  # ModelStreamInferResponse.infer_response


def _field(number: int, payload: bytes) -> bytes:
    return _varint_bytes(number << 3 | _LEN) + _varint_bytes(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    """A string field, or nothing for "" (proto3 leaves defaults out)."""
    if not text:
        return b""
    return _field(number, text.encode())


def _parameter(value: bool | int | str) -> bytes:
    """An InferParameter, by the value's type as codec.set_parameter chooses it."""
    if isinstance(value, bool):
        return b"\x08\x01" if value else b"\x08\x00"
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise ValueError(f"parameter value {value} does not fit int64")
        return b"\x10" + _varint_bytes(value)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    return _field(3, value.encode())


def _parameters(items: tuple[tuple[str, type, bool | int | str], ...]) -> bytes:
    """ModelInferResponse.parameters entries from (name, type, value) items."""
    return b"".join(
        _field(4, _string(1, key) + _field(2, _parameter(value))) for key, _, value in items
    )


def _names_of(model: str, version: str) -> bytes:
    return _string(1, model) + _string(2, version)


def _output_header(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    packed = b"".join(_varint_bytes(d) for d in shape)
    tensor = _string(1, name) + _string(2, datatype) + (_field(3, packed) if packed else b"")
    return _field(5, tensor)


class _Memo(dict[Any, bytes]):
    """Encoded parts that repeat from answer to answer (names, parameters, shapes); bounded."""

    LIMIT = 4096

    def get_or(self, key: Any, make: Callable[..., bytes]) -> bytes:
        """The bytes of make(*key), made once."""
        found = self.get(key)
        if found is None:
            if len(self) >= self.LIMIT:
                self.clear()
            found = self[key] = make(*key)
        return found


_names = _Memo()
_parameter_sets = _Memo()
_headers = _Memo()


def infer_response(
    model: str,
    version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, bool | int | str] | None = None,
    *,
    streamed: bool = False,
) -> bytes:
    """A serialized ModelInferResponse: raw_output_contents, outputs in the given order.
    streamed=True: the ModelStreamInferResponse carrying it (no error_message)."""
    parts, size = _response_parts(model, version, request_id, outputs, parameters)
    if streamed:
        parts[:0] = [_STREAM_ANSWER_TAG, _varint_bytes(size)]
    return b"".join(parts)


def _response_parts(
    model: str,
    version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, bool | int | str] | None,
) -> tuple[list[bytes | memoryview], int]:
    """A ModelInferResponse's parts in wire order, and their size in bytes."""
    # Each value's type in the key: False == 0 as a dict key, but not on the wire.
    items = tuple((k, type(v), v) for k, v in parameters.items()) if parameters else ()
    parts: list[bytes | memoryview] = [
        _names.get_or((model, version), _names_of),
        _string(3, request_id),
        _parameter_sets.get_or((items,), _parameters),
    ]
    arrays = []
    for name, array in outputs.items():
        datatype = contract.datatype_of(array)
        # (ascontiguousarray makes a 0-d array 1-d: the shape is the array's own)
        data = np.ascontiguousarray(array, dtype=contract.DTYPES[datatype])
        parts.append(_headers.get_or((name, datatype, array.shape), _output_header))
        arrays.append(data)
    size = sum(len(part) for part in parts)
    for data in arrays:  # each array's bytes copied once, into the answer
        length = _varint_bytes(data.nbytes)
        parts += [_RAW_OUTPUT_TAG, length, data.data]
        size += len(_RAW_OUTPUT_TAG) + len(length) + data.nbytes
    return parts, size
