"""The data plane's own request and response types: names, datatypes, arrays, parameters.

No transport in them. The gRPC layer (mha.service.grpc.messages) turns a ModelInferRequest
into an InferRequest and an InferResponse back into a ModelInferResponse; an in-process
caller builds InferRequest.from_arrays(...) directly.

An input's data stays as the transport delivered it (raw bytes, a sequence of typed
values, or an array) until validation has checked its header against every limit, so a
hostile declared shape costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mha import contract

Parameter = bool | int | str


@dataclass(frozen=True)
class Unreadable:
    """An input whose data the transport could not deliver, and why (told to the client)."""

    reason: str


# Row-major little-endian bytes (or a view of received bytes) | typed values in order |
# an array | why there is none.
Payload = bytes | memoryview | Sequence[Any] | np.ndarray | Unreadable


@dataclass(frozen=True)
class InputTensor:
    """One input as the client sent it: header, and its data not yet decoded."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Payload
    source: str = "raw contents"  # where `data` came from, named in errors

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> InputTensor:
        """An input from an array (in-process callers)."""
        return cls(name, contract.datatype_of(array), tuple(array.shape), array, "array")


@dataclass
class InferRequest:
    """One inference request for one model version.

    timeout is what the client left of its deadline when the request arrived (None = no
    deadline); `received` is time.monotonic() then, so the deadline is received + timeout.
    """

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: Sequence[InputTensor] = ()
    outputs: Sequence[str] = ()  # empty = the contract's default outputs
    parameters: Mapping[str, Parameter] = field(default_factory=dict)
    timeout: float | None = None
    received: float = field(default_factory=time.monotonic)
    unreadable: str | None = None  # why the transport could not read the tensors, if so
    session: Hashable | None = None  # the stream that carries it (sequences end with it)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.received + self.timeout

    @classmethod
    def from_arrays(
        cls, model_name: str, inputs: Mapping[str, np.ndarray], **fields: Any
    ) -> InferRequest:
        """A request from arrays by input name; other fields as keywords."""
        tensors = tuple(InputTensor.from_array(n, a) for n, a in inputs.items())
        return cls(model_name, inputs=tensors, **fields)


@dataclass
class InferResponse:
    """The answer: outputs in the order asked, and how it was served."""

    model_name: str
    model_version: str
    id: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Parameter] = field(default_factory=dict)
    queue_ns: int = 0  # from receipt to the start of the session run
    compute_ns: int = 0  # the session run that served it (shared when batched)
    batch_size: int = 0  # samples in that run (>= this request's B when batched)
