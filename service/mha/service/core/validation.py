"""Decode and check a ModelInferRequest against one model version, before any allocation.

Order: the request's structure (raw vs typed, counts, names), then every tensor header
(datatype, rank, dims, limits) and the agreement of B and S between tensors, and only then
the data (lengths, decoding, finiteness). Nothing the size of a tensor is allocated until
its header passed every limit, so a hostile shape costs nothing.

NaN and Inf inputs are refused with INVALID_ARGUMENT naming the tensor and the first bad
index: attention mixes every key position into every output row, so one NaN in a key (even
a padded one: 0 * NaN = NaN) would silently poison a whole answer, and with batching it
could be hard to trace. The check is one pass over the input (~10 us for 128 x 512 fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.core.errors import InvalidArgument, ResourceExhausted
from mha.service.core.repository import ModelSpec, TensorSpec
from mha.service.grpc import codec

MASK = "key_padding_mask"
DEFAULT_OUTPUTS = ("output",)  # attention_weights only when the request asks for it
_FIXED_DIM_NAMES = {"query": "d_model", "key": "kdim", "value": "vdim"}

InputTensor = pb.ModelInferRequest.InferInputTensor


@dataclass(frozen=True)
class Limits:
    """Per-request limits of one model version."""

    max_batch_size: int
    max_sequence_length: int
    max_bytes: int  # one tensor's decoded size (the gRPC message limit)


@dataclass(frozen=True)
class Decoded:
    inputs: dict[str, np.ndarray]  # every graph input, the mask filled in when omitted
    outputs: tuple[str, ...]


def _shape(dims: Sequence[int]) -> list[int]:
    return [int(d) for d in dims]


def check_structure(request: pb.ModelInferRequest, spec: ModelSpec) -> dict[str, InputTensor]:
    """Raw vs typed, raw count, duplicate / unknown / missing names; inputs by name."""
    raw_count = len(request.raw_input_contents)
    typed = [t.name for t in request.inputs if codec.typed_count(t.contents)]
    if raw_count and typed:
        raise InvalidArgument(
            f"input {typed[0]!r} has typed contents while the request also has "
            f"raw_input_contents; use one or the other for all inputs"
        )
    if raw_count and raw_count != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {raw_count} entries, expected one per input "
            f"({len(request.inputs)} inputs)"
        )
    by_name: dict[str, InputTensor] = {}
    for tensor in request.inputs:
        if tensor.name in by_name:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        if spec.input(tensor.name) is None:
            expected = ", ".join(t.name for t in spec.inputs)
            raise InvalidArgument(
                f"unknown input {tensor.name!r} for model {spec.name!r}; expected: {expected}"
            )
        by_name[tensor.name] = tensor
    for expected_input in spec.inputs:
        if not expected_input.optional and expected_input.name not in by_name:
            raise InvalidArgument(
                f"missing input {expected_input.name!r} for model {spec.name!r} "
                f"({expected_input.datatype} {list(expected_input.shape)})"
            )
    return by_name


def check_header(tensor: InputTensor, expected: TensorSpec, limits: Limits) -> None:
    """Datatype, rank, dims, size limits of one input, from its header alone."""
    name, shape = tensor.name, _shape(tensor.shape)
    if tensor.datatype not in codec.PROTOCOL_DATATYPES:
        raise InvalidArgument(
            f"input {name!r}: unknown datatype {tensor.datatype!r}; expected {expected.datatype}"
        )
    if tensor.datatype != expected.datatype:
        raise InvalidArgument(
            f"input {name!r}: datatype {tensor.datatype}, the model expects {expected.datatype}"
        )
    if len(shape) != len(expected.shape):
        raise InvalidArgument(
            f"input {name!r}: rank {len(shape)} (shape {shape}), expected rank "
            f"{len(expected.shape)} {list(expected.shape)}"
        )
    for axis, size in enumerate(shape):
        if size < 0:
            raise InvalidArgument(f"input {name!r}: dimension {axis} is negative ({shape})")
        if size == 0:
            raise InvalidArgument(f"input {name!r}: dimension {axis} is zero ({shape})")
    nbytes = int(np.prod(shape, dtype=object)) * codec.DTYPES[expected.datatype].itemsize
    if nbytes > limits.max_bytes:
        raise ResourceExhausted(
            f"input {name!r}: shape {shape} is {nbytes} bytes, over the limit of "
            f"{limits.max_bytes} bytes"
        )
    for axis, size in enumerate(expected.shape):
        if size != -1 and shape[axis] != size:
            what = _FIXED_DIM_NAMES.get(name, f"dimension {axis}")
            raise InvalidArgument(
                f"input {name!r}: dimension {axis} is {shape[axis]}, expected {size} ({what})"
            )
    if shape[0] > limits.max_batch_size:
        raise ResourceExhausted(
            f"input {name!r}: batch size {shape[0]} is over the limit of {limits.max_batch_size}"
        )
    if shape[1] > limits.max_sequence_length:
        raise ResourceExhausted(
            f"input {name!r}: sequence length {shape[1]} is over the limit of "
            f"{limits.max_sequence_length}"
        )


def check_agreement(by_name: dict[str, InputTensor], self_attention: bool) -> None:
    """Same B everywhere; key, value and mask share S (the query's L when self-attention)."""
    shapes = {name: _shape(t.shape) for name, t in by_name.items()}
    batch = shapes["query"][0]
    for name, shape in shapes.items():
        if shape[0] != batch:
            raise InvalidArgument(
                f"input {name!r}: batch size {shape[0]} does not match query's {batch}"
            )
    source = "query" if self_attention else "key"
    length = shapes[source][1]
    for name in ("value", MASK) if not self_attention else (MASK,):
        if name in shapes and shapes[name][1] != length:
            raise InvalidArgument(
                f"input {name!r}: sequence length {shapes[name][1]} does not match "
                f"{source}'s {length}"
            )


def decode_tensor(tensor: InputTensor, raw: bytes | None) -> np.ndarray:
    """The array of one input whose header passed; checks length / count and values."""
    name, shape, datatype = tensor.name, _shape(tensor.shape), tensor.datatype
    count = int(np.prod(shape))
    if raw is not None:
        expected_bytes = count * codec.DTYPES[datatype].itemsize
        if len(raw) != expected_bytes:
            raise InvalidArgument(
                f"input {name!r}: raw contents are {len(raw)} bytes, shape {shape} of "
                f"{datatype} needs {expected_bytes}"
            )
        array = codec.from_raw(raw, datatype, shape)
    else:
        array = _decode_typed(tensor, shape, count)
    _check_values(name, array)
    return array


def _decode_typed(tensor: InputTensor, shape: list[int], count: int) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    field = codec.TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(
            f"input {name!r}: {datatype} data must travel in raw_input_contents (the protocol "
            f"has no typed field for it)"
        )
    present = codec.typed_count(tensor.contents)
    others = sorted(set(present) - {field})
    if others:
        raise InvalidArgument(
            f"input {name!r}: typed contents in {', '.join(others)}, expected {field} for "
            f"{datatype}"
        )
    if present.get(field, 0) != count:
        raise InvalidArgument(
            f"input {name!r}: {field} holds {present.get(field, 0)} values, shape {shape} "
            f"needs {count}"
        )
    return codec.from_typed(tensor.contents, datatype, shape)


def _check_values(name: str, array: np.ndarray) -> None:
    if array.dtype == np.bool_:
        # numpy reads any nonzero byte as a "bool" that is neither True nor False in sums.
        if array.view(np.uint8).max(initial=0) > 1:
            raise InvalidArgument(f"input {name!r}: BOOL bytes must be 0 or 1")
        return
    finite = np.isfinite(array)
    if not finite.all():
        index = [int(i) for i in np.argwhere(~finite)[0]]
        raise InvalidArgument(
            f"input {name!r}: holds NaN or Inf (first at index {index}); inputs must be finite"
        )


def requested_outputs(request: pb.ModelInferRequest, spec: ModelSpec) -> tuple[str, ...]:
    """Output names asked for (default: output only), each checked against the model."""
    names = tuple(o.name for o in request.outputs) or DEFAULT_OUTPUTS
    seen: set[str] = set()
    for name in names:
        if name not in spec.output_names:
            raise InvalidArgument(
                f"requested output {name!r} does not exist in model {spec.name!r}; it has: "
                f"{', '.join(spec.output_names)}"
            )
        if name in seen:
            raise InvalidArgument(f"output {name!r} requested more than once")
        seen.add(name)
    return names


def decode(request: pb.ModelInferRequest, spec: ModelSpec, limits: Limits) -> Decoded:
    """Every check of the request, then its arrays (the mask filled in when omitted)."""
    by_name = check_structure(request, spec)
    for name, tensor in by_name.items():
        expected = spec.input(name)
        assert expected is not None  # check_structure refused unknown names
        check_header(tensor, expected, limits)
    check_agreement(by_name, spec.self_attention)
    outputs = requested_outputs(request, spec)
    raws = list(request.raw_input_contents)
    arrays = {
        tensor.name: decode_tensor(tensor, raws[index] if raws else None)
        for index, tensor in enumerate(request.inputs)
    }
    if MASK not in arrays:
        query_or_key = arrays["query" if spec.self_attention else "key"]
        arrays[MASK] = np.zeros(query_or_key.shape[:2], dtype=bool)
    inputs = {t.name: arrays[t.name] for t in spec.inputs}  # graph order
    return Decoded(inputs=inputs, outputs=outputs)
