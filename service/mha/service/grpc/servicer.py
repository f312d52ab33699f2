"""The Open Inference Protocol servicer: one short method per RPC.

Each method decodes, calls the core (ModelTable, validation, the model's scheduler) and
encodes. Errors become status codes in ONE place, the `rpc` decorator: a ServiceError
carries its code and client-safe message; anything else is INTERNAL with a fixed message,
the traceback going to the log under the request id.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

import grpc

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core import logs, validation
from mha.service.core.errors import INTERNAL_MESSAGE, ServiceError, Unavailable
from mha.service.core.runtime import ModelTable, ServedModel
from mha.service.core.scheduling import InferenceJob
from mha.service.core.stats import StatsMetrics
from mha.service.grpc import codec

log = logging.getLogger(__name__)

SERVER_NAME = "mha-serve"
PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX Runtime models
# ServerMetadata extensions: the optional protocol parts served, plus one
# "device:<provider>" entry per execution provider in use (the protocol has no field for it).
EXTENSIONS = ("statistics",)

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


def rpc(method: Handler) -> Handler:
    """Map exceptions to status codes: the one place where that happens."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = getattr(request, "id", "") or uuid.uuid4().hex[:12]
        token = logs.request_id.set(request_id)
        extra = {"request_id": request_id}  # for handlers without logs.RequestIdFilter
        try:
            return await method(self, request, context)
        except ServiceError as err:
            log.info("%s refused: %s %s", method.__name__, err.code.name, err.message, extra=extra)
            await context.abort(err.code, err.message)
        except Exception:
            log.exception("%s failed unexpectedly", method.__name__, extra=extra)
            await context.abort(grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE}: {request_id}")
        finally:
            logs.request_id.reset(token)

    return handler


def _outcome(err: BaseException) -> str:
    return err.reason if isinstance(err, ServiceError) else "internal"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a ModelTable; readiness comes from the server's lifecycle.

    After `refuse_new()` (the server is stopping) ModelInfer answers UNAVAILABLE at once
    while the requests already in it (`active`) finish.
    """

    def __init__(
        self, table: ModelTable, metrics: StatsMetrics, is_ready: Callable[[], bool]
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.is_ready = is_ready
        self.active = 0  # ModelInfer calls in progress (event loop only, no lock needed)
        self.last_call = 0.0  # time.monotonic() of the latest ModelInfer call
        self.refusing = False

    def refuse_new(self) -> None:
        self.refusing = True

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        spec = self.table.resolve(request.name, request.version)
        return pb.ModelReadyResponse(ready=(spec.name, spec.version) in self.table.served)

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        devices = [f"device:{p}" for p in self.table.providers()]
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_version(), extensions=[*EXTENSIONS, *devices]
        )

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        """Tensors from mha.json; key_padding_mask is listed but optional in a request.

        The protocol's TensorMetadata has no "optional" flag: a request may omit the mask
        (nothing padded). versions = every version on disk; platform = onnxruntime_onnx.
        """
        spec = self.table.resolve(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=[str(v) for v in sorted(self.table.specs[spec.name])],
            platform=PLATFORM,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.outputs],
        )

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Any:
        if request.name:
            spec = self.table.resolve(request.name, request.version)
            specs = [spec] if request.version else list(self.table.specs[spec.name].values())
        else:
            specs = self.table.all_specs()
        stats = self.metrics.statistics
        return pb.ModelStatisticsResponse(
            model_stats=[stats.proto(s.name, str(s.version)) for s in specs]
        )

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        started = time.monotonic()
        labels = ("", "")  # unknown model names stay out of the metric labels
        self.active += 1
        self.last_call = started
        try:
            if self.refusing:
                raise Unavailable("the server is shutting down; send the request again")
            served = self.table.get(request.model_name, request.model_version)
            labels = (served.spec.name, str(served.spec.version))
            response = await self._infer(served, request, context, started)
        except BaseException as err:
            self._failed(labels, err, started)
            raise
        finally:
            self.active -= 1
        return response

    async def _infer(
        self, served: ServedModel, request: pb.ModelInferRequest, context: Any, started: float
    ) -> pb.ModelInferResponse:
        spec, labels = served.spec, (served.spec.name, str(served.spec.version))
        decoded = validation.decode(request, spec, served.limits)
        remaining = context.time_remaining()
        job = InferenceJob(
            request_id=request.id,
            inputs=decoded.inputs,
            outputs=decoded.outputs,
            deadline=None if remaining is None else started + remaining,
        )
        self.metrics.inflight.labels(*labels).inc()
        try:
            result = await served.scheduler.submit(job)
        finally:
            self.metrics.inflight.labels(*labels).dec()
        response = codec.infer_response(spec.name, labels[1], request.id, result.outputs)
        response.parameters["provider"].string_param = served.loaded.provider
        elapsed = time.monotonic() - started
        self.metrics.request_done(*labels, "success", elapsed)
        self.metrics.queued(*labels, result.queue_ns / 1e9)
        self.metrics.statistics.success(
            *labels, int(elapsed * 1e9), result.queue_ns, result.compute_ns, job.batch_size
        )
        if log.isEnabledFor(logging.DEBUG):  # an access log line, off at the default INFO
            log.debug(
                "ModelInfer %s/%s query %s: %.2f ms (queue %.2f, compute %.2f, run of %d)",
                *labels, list(job.inputs["query"].shape), elapsed * 1e3,
                result.queue_ns / 1e6, result.compute_ns / 1e6, result.batch_size,
            )  # fmt: skip
        return response

    def _failed(self, labels: tuple[str, str], err: BaseException, started: float) -> None:
        # A BaseException that is not an Exception is the task's cancellation (client gone).
        outcome = _outcome(err) if isinstance(err, Exception) else "cancelled"
        elapsed = time.monotonic() - started
        self.metrics.request_done(*labels, outcome, elapsed)
        if labels[0]:
            self.metrics.statistics.failure(*labels, int(elapsed * 1e9))
