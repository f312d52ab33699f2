"""What a sequence request must carry: Triton's sequence parameters, one sequence, a memory.

sequence_control reads the parameters; check_one_sequence and memory_request_spec state the
rules the data plane applies before a request touches a sequence's cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from mha import contract
from mha.service.core import sequences
from mha.service.core.errors import InvalidArgument
from mha.service.core.inference import InferRequest
from mha.service.core.repository import ModelSpec
from mha.service.core.sequences import SequenceId


@dataclass(frozen=True)
class SequenceControl:
    """A request's sequence parameters (Triton's sequence extension)."""

    sequence_id: SequenceId
    start: bool
    end: bool


SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def sequence_control(parameters: Mapping[str, object], model: str) -> SequenceControl | None:
    """The sequence parameters of a request, None when it has no sequence_id.

    sequence_id is int64 or string (0 and "" mean none, as in Triton's clients);
    sequence_start and sequence_end are bool. InvalidArgument names a wrong type.
    """
    sequence_id = parameters.get("sequence_id")
    for flag in ("sequence_start", "sequence_end"):
        if flag in parameters and not isinstance(parameters[flag], bool):
            raise InvalidArgument(
                f"parameter {flag!r} must be a bool_param, got {parameters[flag]!r}"
            )
    if sequence_id is None or sequence_id == 0 or sequence_id == "":
        if parameters.get("sequence_start") or parameters.get("sequence_end"):
            raise InvalidArgument(
                f"model {model!r}: sequence_start / sequence_end need a sequence_id"
            )
        return None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        raise InvalidArgument(
            f"parameter 'sequence_id' must be an int64_param or a string_param, got {sequence_id!r}"
        )
    return SequenceControl(
        sequence_id,
        bool(parameters.get("sequence_start", False)),
        bool(parameters.get("sequence_end", False)),
    )


def check_one_sequence(request: InferRequest, key: sequences.SequenceKey) -> None:
    """A sequence request carries one sequence: query's batch size must be 1."""
    for tensor in request.inputs:
        if tensor.name == contract.QUERY and tensor.shape and tensor.shape[0] != 1:
            raise InvalidArgument(
                f"{sequences.describe(key)}: input 'query' has batch size {tensor.shape[0]}; "
                f"a sequence request carries exactly one sequence (batch size 1)"
            )


MEMORY_INPUTS = (contract.KEY, contract.VALUE, contract.KEY_PADDING_MASK)


def memory_request_spec(
    spec: ModelSpec,
    request: InferRequest,
    control: SequenceControl,
    key: sequences.SequenceKey,
) -> ModelSpec:
    """The inputs a memory sequence's request may carry: the memory only with its start."""
    sent = {t.name for t in request.inputs}
    if control.start:
        missing = [n for n in (contract.KEY, contract.VALUE) if n not in sent]
        if missing:
            raise InvalidArgument(
                f"{sequences.describe(key)}: the request with sequence_start carries the memory "
                f"the sequence attends: inputs 'key' and 'value' (and optionally "
                f"'key_padding_mask'); missing {', '.join(repr(n) for n in missing)}"
            )
        return spec
    again = [n for n in MEMORY_INPUTS if n in sent]
    if again:
        raise InvalidArgument(
            f"{sequences.describe(key)}: {', '.join(repr(n) for n in again)} may come only with "
            f"sequence_start: the server holds this sequence's memory; send 'query' alone (or "
            f"sequence_start to begin it anew with another memory)"
        )
    return dataclasses.replace(
        spec, inputs=tuple(t for t in spec.inputs if t.name == contract.QUERY)
    )
