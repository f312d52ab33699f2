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


def infer(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    version: str = "",
    request_id: str = "",
    typed: bool = False,
) -> Call:
    """ModelInfer; inputs by tensor name (query [B, L, E], ...), raw contents unless typed."""
    request = codec.infer_request(
        model, inputs, outputs, version=version, request_id=request_id, typed=typed
    )
    return Call(INFERENCE, "ModelInfer", request, infer_result)
