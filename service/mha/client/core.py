"""The client's one core: each RPC as a Call (request + how to read the answer), errors, results.

Works against any Open Inference Protocol (KServe v2) server (this project's, Triton,
KServe): requests carry raw contents by default, responses may be raw or typed. The sync
(mha.client.sync) and async (mha.client.aio) faces only run Calls on their channel; every
RPC error becomes a ClientError carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.grpc import codec

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # the server's default limit
INFERENCE, HEALTH = "inference", "health"  # the stub a Call goes to


class ClientError(Exception):
    """An RPC that failed: the gRPC status code and the server's details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ClientError:
        """Wrap a grpc.RpcError (sync or aio)."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


@dataclass
class InferResult:
    """Outputs of one ModelInfer call, by name, and what the server said about it."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    id: str
    latency_s: float  # round trip of the RPC alone (request built, response not decoded)


@dataclass(frozen=True)
class Call:
    """One RPC: which stub and method, the request, and how to read the response.

    read(response, seconds) gets the response and the RPC's round-trip time.
    """

    stub: str
    method: str
    request: Any
    read: Callable[[Any, float], Any] = lambda response, _seconds: response


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel options that lift gRPC's 4 MiB default message limits."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def stubs(channel: grpc.Channel | grpc.aio.Channel) -> dict[str, Any]:
    """The stubs Calls go to, on one channel (sync or aio)."""
    return {
        INFERENCE: pb_grpc.GRPCInferenceServiceStub(channel),
        HEALTH: health_pb2_grpc.HealthStub(channel),
    }


def infer_result(response: pb.ModelInferResponse, latency_s: float) -> InferResult:
    """Decode a ModelInferResponse into arrays (copies, so they are writable)."""
    arrays = {name: np.array(a) for name, a in codec.response_arrays(response).items()}
    return InferResult(arrays, response.model_name, response.model_version, response.id, latency_s)


def live() -> Call:
    return Call(INFERENCE, "ServerLive", pb.ServerLiveRequest(), lambda r, _: bool(r.live))


def ready() -> Call:
    return Call(INFERENCE, "ServerReady", pb.ServerReadyRequest(), lambda r, _: bool(r.ready))


def model_ready(name: str, version: str = "") -> Call:
    request = pb.ModelReadyRequest(name=name, version=version)
    return Call(INFERENCE, "ModelReady", request, lambda r, _: bool(r.ready))


def server_metadata() -> Call:
    return Call(INFERENCE, "ServerMetadata", pb.ServerMetadataRequest())


def model_metadata(name: str, version: str = "") -> Call:
    return Call(INFERENCE, "ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))


def statistics(name: str = "", version: str = "") -> Call:
    request = pb.ModelStatisticsRequest(name=name, version=version)
    return Call(INFERENCE, "ModelStatistics", request)


def health(service: str = "") -> Call:
    """grpc.health.v1 Check, read as the status name: "SERVING", "NOT_SERVING", ..."""
    request = health_pb2.HealthCheckRequest(service=service)
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name
    return Call(HEALTH, "Check", request, lambda r, _: str(status_name(r.status)))


@dataclass(frozen=True)
class SequenceStep:
    """Which sequence a request belongs to (Triton's sequence parameters).

    sequence_id: int64 or string, never 0 or ""; start on the first request (or to begin
    the id anew), end on the last (the server frees the sequence's cache).
    """

    sequence_id: int | str
    start: bool = False
    end: bool = False

    def parameters(self) -> dict[str, bool | int | str]:
        if isinstance(self.sequence_id, bool) or self.sequence_id in (0, ""):
            raise ValueError(f"sequence_id must be a non-zero int or a non-empty string, got "
                             f"{self.sequence_id!r}")  # fmt: skip
        return {
            "sequence_id": self.sequence_id,
            "sequence_start": self.start,
            "sequence_end": self.end,
        }


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    version: str = "",
    request_id: str = "",
    typed: bool = False,
    sequence: SequenceStep | None = None,
) -> pb.ModelInferRequest:
    """The ModelInferRequest of one inference (raw contents unless typed)."""
    parameters = sequence.parameters() if sequence is not None else None
    return codec.infer_request(
        model, inputs, outputs, version=version, request_id=request_id, typed=typed,
        parameters=parameters,
    )  # fmt: skip


def infer(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    version: str = "",
    request_id: str = "",
    typed: bool = False,
    sequence: SequenceStep | None = None,
) -> Call:
    """ModelInfer; inputs by tensor name (query [B, L, E], ...), raw contents unless typed."""
    request = infer_request(model, inputs, outputs, version, request_id, typed, sequence)
    return Call(INFERENCE, "ModelInfer", request, infer_result)


def stream_error(message: str) -> ClientError:
    """A ModelStreamInfer error_message ("<STATUS>: <details>") as a ClientError."""
    name, _, details = message.partition(": ")
    code = getattr(grpc.StatusCode, name, None)
    if not isinstance(code, grpc.StatusCode) or not details:
        return ClientError(grpc.StatusCode.UNKNOWN, message)
    return ClientError(code, details)


@dataclass
class StreamAnswer:
    """One answer on a stream: the result, or the error that answered that request."""

    id: str
    result: InferResult | None
    error: ClientError | None


def stream_answer(response: pb.ModelStreamInferResponse, latency_s: float) -> StreamAnswer:
    request_id = response.infer_response.id
    if response.error_message:
        return StreamAnswer(request_id, None, stream_error(response.error_message))
    return StreamAnswer(request_id, infer_result(response.infer_response, latency_s), None)
