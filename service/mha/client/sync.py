"""A small Open Inference Protocol (KServe v2) gRPC client, sync and async.

Works against any OIP server (this project's, Triton, KServe): requests carry raw
contents by default, responses may be raw or typed. Every RPC error becomes a ClientError
carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.grpc import codec

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # the server's default limit


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


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel options that lift gRPC's 4 MiB default message limits."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def infer_result(response: pb.ModelInferResponse, latency_s: float) -> InferResult:
    """Decode a ModelInferResponse into arrays (copies, so they are writable)."""
    arrays = {name: np.array(a) for name, a in codec.response_arrays(response).items()}
    return InferResult(
        outputs=arrays,
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        latency_s=latency_s,
    )


def health_name(response: health_pb2.HealthCheckResponse) -> str:
    """The serving status as its name: SERVING, NOT_SERVING, ..."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class Client:
    """Blocking client over one channel; use as a context manager or call close()."""

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._channel = grpc.insecure_channel(url, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None

    def live(self) -> bool:
        return bool(self._call(self._stub.ServerLive, pb.ServerLiveRequest()).live)

    def ready(self) -> bool:
        return bool(self._call(self._stub.ServerReady, pb.ServerReadyRequest()).ready)

    def model_ready(self, name: str, version: str = "") -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool(self._call(self._stub.ModelReady, request).ready)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return self._call(self._stub.ServerMetadata, pb.ServerMetadataRequest())

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=name, version=version)
        return self._call(self._stub.ModelMetadata, request)

    def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        request = pb.ModelStatisticsRequest(name=name, version=version)
        return self._call(self._stub.ModelStatistics, request)

    def health(self, service: str = "") -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... (NOT_FOUND if unknown)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_name(self._call(self._health.Check, request))

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
        timeout: float | None = None,
        typed: bool = False,
    ) -> InferResult:
        """Run one ModelInfer; inputs by tensor name (query [B, L, E], ...)."""
        request = codec.infer_request(
            model, inputs, outputs, version=version, request_id=request_id, typed=typed
        )
        start = time.perf_counter()
        response = self._call(self._stub.ModelInfer, request, timeout)
        return infer_result(response, time.perf_counter() - start)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """asyncio client over one grpc.aio channel; `async with` or await close()."""

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(url, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None

    async def live(self) -> bool:
        return bool((await self._call(self._stub.ServerLive, pb.ServerLiveRequest())).live)

    async def ready(self) -> bool:
        return bool((await self._call(self._stub.ServerReady, pb.ServerReadyRequest())).ready)

    async def model_ready(self, name: str, version: str = "") -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool((await self._call(self._stub.ModelReady, request)).ready)

    async def server_metadata(self) -> pb.ServerMetadataResponse:
        return await self._call(self._stub.ServerMetadata, pb.ServerMetadataRequest())

    async def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=name, version=version)
        return await self._call(self._stub.ModelMetadata, request)

    async def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        request = pb.ModelStatisticsRequest(name=name, version=version)
        return await self._call(self._stub.ModelStatistics, request)

    async def health(self, service: str = "") -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... (NOT_FOUND if unknown)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_name(await self._call(self._health.Check, request))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
        timeout: float | None = None,
        typed: bool = False,
    ) -> InferResult:
        """Run one ModelInfer; inputs by tensor name (query [B, L, E], ...)."""
        request = codec.infer_request(
            model, inputs, outputs, version=version, request_id=request_id, typed=typed
        )
        start = time.perf_counter()
        response = await self._call(self._stub.ModelInfer, request, timeout)
        return infer_result(response, time.perf_counter() - start)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
