"""Check and decode an InferRequest against one model version, before any allocation.

Order: the request's structure (counts, names), then every tensor header (datatype, rank,
dims, limits) and the agreement of B and S between tensors, and only then the data
(lengths, decoding, finiteness). Nothing the size of a tensor is allocated until its header
passed every limit, so a hostile shape costs nothing. The transport's own rules (raw vs
typed contents, which typed field) are checked where the transport is decoded
(mha.service.grpc.messages); this module sees only neutral InputTensors.

NaN and Inf inputs are refused with INVALID_ARGUMENT naming the tensor and the first bad
index: attention mixes every key position into every output row, so one NaN in a key (even
a padded one: 0 * NaN = NaN) would silently poison a whole answer, and with batching it
could be hard to trace. The check is one pass over the input (~10 us for 128 x 512 fp32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mha import contract
from mha.service.core.errors import InvalidArgument, ResourceExhausted
from mha.service.core.inference import InferRequest, InputTensor, Unreadable
from mha.service.core.repository import ModelSpec, TensorSpec


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


def check_structure(inputs: Sequence[InputTensor], spec: ModelSpec) -> dict[str, InputTensor]:
    """Duplicate / unknown / missing names; inputs by name."""
    by_name: dict[str, InputTensor] = {}
    for tensor in inputs:
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
                + _memory_hint(expected_input.name, spec)
            )
    return by_name


def _memory_hint(missing: str, spec: ModelSpec) -> str:
    if missing not in (contract.KEY, contract.VALUE) or spec.sequence is not None:
        return ""
    return (
        "; a cross-attention model takes key and value with every request (a model exported "
        "with --cross --kv-cache holds a sequence's memory and takes query alone)"
    )


def check_header(tensor: InputTensor, expected: TensorSpec, limits: Limits) -> None:
    """Datatype, rank, dims, size limits of one input, from its header alone."""
    name, shape = tensor.name, list(tensor.shape)
    if tensor.datatype not in contract.PROTOCOL_DATATYPES:
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
    _check_dims(name, shape, expected, limits)


def _check_dims(name: str, shape: list[int], expected: TensorSpec, limits: Limits) -> None:
    for axis, size in enumerate(shape):
        if size < 0:
            raise InvalidArgument(f"input {name!r}: dimension {axis} is negative ({shape})")
        if size == 0:
            raise InvalidArgument(f"input {name!r}: dimension {axis} is zero ({shape})")
    nbytes = math.prod(shape) * contract.DTYPES[expected.datatype].itemsize
    if nbytes > limits.max_bytes:
        raise ResourceExhausted(
            f"input {name!r}: shape {shape} is {nbytes} bytes, over the limit of "
            f"{limits.max_bytes} bytes"
        )
    for axis, size in enumerate(expected.shape):
        if size != -1 and shape[axis] != size:
            what = contract.fixed_dim_name(name, axis)
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
    shapes = {name: list(t.shape) for name, t in by_name.items()}
    batch = shapes[contract.QUERY][0]
    for name, shape in shapes.items():
        if shape[0] != batch:
            raise InvalidArgument(
                f"input {name!r}: batch size {shape[0]} does not match query's {batch}"
            )
    source = contract.QUERY if self_attention else contract.KEY
    if source not in shapes:  # a memory sequence's step: query alone, the memory is held
        return
    length = shapes[source][1]
    for name in contract.KEY_SIDE:
        if name != source and name in shapes and shapes[name][1] != length:
            raise InvalidArgument(
                f"input {name!r}: sequence length {shapes[name][1]} does not match "
                f"{source}'s {length}"
            )


def decode_tensor(tensor: InputTensor) -> np.ndarray:
    """The array of one input whose header passed; checks length / count and values."""
    name, shape, dtype = tensor.name, list(tensor.shape), contract.DTYPES[tensor.datatype]
    count = math.prod(shape)
    data = tensor.data
    if isinstance(data, Unreadable):
        raise InvalidArgument(f"input {name!r}: {data.reason}")
    if isinstance(data, (bytes, memoryview)):  # a memoryview here is of bytes: len = bytes
        if len(data) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r}: {tensor.source} are {len(data)} bytes, shape {shape} of "
                f"{tensor.datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    elif isinstance(data, np.ndarray):
        if data.size != count:
            raise InvalidArgument(
                f"input {name!r}: {tensor.source} holds {data.size} values, shape {shape} "
                f"needs {count}"
            )
        array = np.ascontiguousarray(data, dtype=dtype).reshape(shape)
    else:
        if len(data) != count:
            raise InvalidArgument(
                f"input {name!r}: {tensor.source} holds {len(data)} values, shape {shape} "
                f"needs {count}"
            )
        array = np.asarray(data, dtype=dtype).reshape(shape)
    _check_values(name, array)
    return array


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


def requested_outputs(asked: Sequence[str], spec: ModelSpec) -> tuple[str, ...]:
    """Output names asked for (default: output only), each checked against the model."""
    names = tuple(asked) or contract.DEFAULT_OUTPUTS
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


@dataclass(frozen=True)
class Checked:
    """A request whose structure and headers passed; its data not yet read."""

    request: InferRequest
    spec: ModelSpec
    outputs: tuple[str, ...]

    @property
    def elements(self) -> int:
        """Input elements the headers declare: the request's work (core.admission)."""
        return sum(math.prod(t.shape) for t in self.request.inputs)

    def decode(self) -> Decoded:
        """The arrays (lengths, values checked), the mask filled in when omitted."""
        spec = self.spec
        arrays = {tensor.name: decode_tensor(tensor) for tensor in self.request.inputs}
        if contract.KEY_PADDING_MASK not in arrays and spec.input(contract.KEY_PADDING_MASK):
            query_or_key = arrays[contract.QUERY if spec.self_attention else contract.KEY]
            arrays[contract.KEY_PADDING_MASK] = np.zeros(query_or_key.shape[:2], dtype=bool)
        inputs = {t.name: arrays[t.name] for t in spec.inputs}  # graph order
        return Decoded(inputs=inputs, outputs=self.outputs)


def check(request: InferRequest, spec: ModelSpec, limits: Limits) -> Checked:
    """Every check that needs no data: structure, headers, agreement, outputs."""
    if request.unreadable is not None:
        raise InvalidArgument(request.unreadable)
    by_name = check_structure(request.inputs, spec)
    for name, tensor in by_name.items():
        expected = spec.input(name)
        assert expected is not None  # check_structure refused unknown names
        check_header(tensor, expected, limits)
    check_agreement(by_name, spec.self_attention)
    return Checked(request, spec, requested_outputs(request.outputs, spec))


def decode(request: InferRequest, spec: ModelSpec, limits: Limits) -> Decoded:
    """Every check of the request, then its arrays (the mask filled in when omitted)."""
    return check(request, spec, limits).decode()
