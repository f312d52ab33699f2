"""The Open Inference Protocol servicer: one short method per RPC.

Each method decodes the message (mha.service.grpc.messages), calls the data plane
(mha.service.core.dataplane) and encodes its answer. Errors become status codes in ONE
place, the `rpc` decorator: a ServiceError carries its status and client-safe message;
anything else is INTERNAL with a fixed message, the traceback going to the log under the
request id.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Any

import grpc

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core import logs
from mha.service.core.errors import INTERNAL_MESSAGE, ServiceError
from mha.service.grpc import messages, wire
from mha.service.grpc.guard import Codec, Undecodable
from mha.service.grpc.plane import Plane
from mha.service.grpc.streams import StreamAnswers

log = logging.getLogger(__name__)

SERVER_NAME = "mha-serve"
# ServerMetadata extensions: the optional protocol parts served, plus one
# "device:<provider>" entry per execution provider in use (the protocol has no field for it).
EXTENSIONS = ("statistics", "sequence")

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]

# Methods registered with their own Codec (Registrar): ModelInfer's and ModelStreamInfer's
# requests split from their tensor bytes, their answers written as bytes (mha.service.grpc.wire).
CODECS: dict[str, Codec] = {
    "/inference.GRPCInferenceService/ModelInfer": (wire.split_infer_request, None),
    "/inference.GRPCInferenceService/ModelStreamInfer": (wire.split_infer_request, None),
}


def _version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


def status_code(err: ServiceError) -> grpc.StatusCode:
    """The gRPC code of a refusal: core statuses are named after gRPC's."""
    return grpc.StatusCode[err.code.name]


def rpc(method: Handler) -> Handler:
    """Map exceptions to status codes: the one place where that happens."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = getattr(request, "id", "") or logs.new_request_id()
        token = logs.request_id.set(request_id)
        extra = {"request_id": request_id}  # for handlers without logs.RequestIdFilter
        try:
            return await method(self, request, context)
        except ServiceError as err:
            log.info("%s refused: %s %s", method.__name__, err.code.name, err.message, extra=extra)
            await context.abort(status_code(err), err.message)
        except Exception:
            log.exception("%s failed unexpectedly", method.__name__, extra=extra)
            await context.abort(grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE}: {request_id}")
        finally:
            logs.request_id.reset(token)

    return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a data plane; readiness comes from the server's lifecycle.
    `extensions` are added to ServerMetadata's (a frontend's "frontend:<index>")."""

    def __init__(
        self, plane: Plane, is_ready: Callable[[], bool], extensions: tuple[str, ...] = ()
    ) -> None:
        self.plane = plane
        self.is_ready = is_ready
        self.extensions = extensions

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        devices = [f"device:{p}" for p in self.plane.providers()]
        extensions = [*EXTENSIONS, *devices, *self.extensions]
        version = _version()
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=extensions)

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        spec = self.plane.model(request.name, request.version)
        return messages.model_metadata(spec, self.plane.versions(spec.name))

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Any:
        figures = self.plane.statistics(request.name, request.version)
        if inspect.isawaitable(figures):  # a frontend's plane asks the engine
            figures = await figures
        return pb.ModelStatisticsResponse(
            model_stats=[messages.version_statistics(spec, stats) for spec, stats in figures]
        )

    @rpc
    async def ModelInfer(self, request: wire.SplitRequest, context: Any) -> bytes:
        """The hot path: tensors as views of the received bytes, the answer written as
        bytes (CODECS registers the method so)."""
        decoded = messages.infer_request(request, context.time_remaining())
        return messages.infer_response_bytes(await self.plane.infer(decoded))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[wire.SplitRequest | Undecodable], context: Any
    ) -> AsyncIterator[bytes]:
        """Each request answered on the stream, in completion order; an error answers that
        request alone (error_message) and the stream stays open. Requests start in arrival
        order, so those of one sequence run in that order. The sequences a stream started
        end with it."""
        stream = StreamAnswers(self.plane, context)
        try:
            async for answer in stream.run(requests):
                yield answer
        finally:
            await stream.close()
