"""ModelStreamInfer: many requests over one bidirectional stream, answered as they finish.

Each request becomes a task started in arrival order (so the requests of one sequence take
their turns in that order, mha.service.core.sequences), its answer or its error goes on a
queue, and the servicer writes the queue to the stream. Requests are split and answers
written as bytes, as ModelInfer's are (mha.service.grpc.wire). A request's refusal answers
that request in `error_message` ("<STATUS>: <message>", the status named as gRPC names it,
since a stream response has no status field of its own); anything unexpected is answered
with the fixed internal message and the request id, the traceback going to the log. When the client
ends its side, the answers still pending are written before the stream ends; when the
client goes away, pending requests are cancelled. Either way the sequences the stream
started are ended (their caches freed). A message that does not parse
(mha.service.grpc.guard) is answered INVALID_ARGUMENT on its own, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.core import logs
from mha.service.core.errors import INTERNAL_MESSAGE, ServiceError
from mha.service.grpc import messages
from mha.service.grpc.guard import Undecodable
from mha.service.grpc.plane import Plane
from mha.service.grpc.wire import SplitRequest

log = logging.getLogger(__name__)
_DONE = object()  # the request side ended and every answer is queued


class StreamAnswers:
    """The answers of one stream; `run` yields them, `close` ends what is left."""

    def __init__(self, plane: Plane, context: Any) -> None:
        self.plane = plane
        self.context = context
        self.session = f"stream-{logs.new_request_id()}"  # owner of the sequences it starts
        self.answers: asyncio.Queue[Any] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(
        self, requests: AsyncIterator[SplitRequest | Undecodable]
    ) -> AsyncIterator[bytes]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (answer := await self.answers.get()) is not _DONE:
                yield answer
        finally:
            reader.cancel()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        ended = self.plane.session_closed(self.session)
        if ended:
            log.info("stream %s closed: %d sequence(s) ended with it", self.session, ended)

    async def _read(self, requests: AsyncIterator[SplitRequest | Undecodable]) -> None:
        async for request in requests:
            if isinstance(request, Undecodable):  # answered alone; the stream goes on
                answer = self._error(pb.ModelInferRequest(), f"INVALID_ARGUMENT: {request.message}")
                await self.answers.put(answer)
                continue
            task = asyncio.create_task(self._answer(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.answers.put(_DONE)

    async def _answer(self, request: SplitRequest) -> None:
        request_id = request.id or logs.new_request_id()
        token = logs.request_id.set(request_id)
        try:
            decoded = messages.infer_request(request, None, self.session)
            answer = messages.infer_response_bytes(await self.plane.infer(decoded), streamed=True)
            await self.answers.put(answer)
        except ServiceError as err:
            log.info("ModelStreamInfer refused: %s %s", err.code.name, err.message)
            await self.answers.put(self._error(request.message, f"{err.code.name}: {err.message}"))
        except Exception:
            log.exception("ModelStreamInfer failed unexpectedly")
            message = f"INTERNAL: {INTERNAL_MESSAGE}: {request_id}"
            await self.answers.put(self._error(request.message, message))
        finally:
            logs.request_id.reset(token)

    @staticmethod
    def _error(request: pb.ModelInferRequest, message: str) -> bytes:
        # The response names the request it answers, so a client can correlate the error.
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        answer = pb.ModelStreamInferResponse(error_message=message, infer_response=response)
        return answer.SerializeToString()
