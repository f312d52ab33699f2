"""ModelStreamInfer from the client: send requests, receive answers as the server finishes them.

    with client.stream() as stream:
        stream.send("kv", {"query": prompt}, sequence=SequenceStep(7, start=True))
        answer = stream.receive()        # StreamAnswer: .result (InferResult) or .error

Answers arrive in completion order; a request's id (request_id=...) tells which one an
answer belongs to. The requests of one sequence are answered in the order they were sent.
An error answers that request alone; the stream stays open. Closing the stream ends the
sequences it started (the server frees their caches).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from mha.client import core
from mha.client.core import ClientError, SequenceStep, StreamAnswer
from mha.client.security import Metadata

_END = object()


class Stream:
    """One ModelStreamInfer call on a blocking channel; a context manager."""

    def __init__(self, stub: Any, metadata: Metadata = ()) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._sent: queue.Queue[float] = queue.Queue()  # send times, for latencies
        self._responses = stub.ModelStreamInfer(iter(self._requests.get, _END), metadata=metadata)

    def send(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
        sequence: SequenceStep | None = None,
    ) -> None:
        """Queue one request on the stream (returns at once)."""
        self._sent.put(time.perf_counter())
        self._requests.put(core.infer_request(model, inputs, outputs, version, request_id,
                                              sequence=sequence))  # fmt: skip

    def receive(self) -> StreamAnswer:
        """The next answer (blocks); ClientError if the stream itself failed or ended."""
        try:
            response = next(self._responses)
        except StopIteration:
            raise ClientError(grpc.StatusCode.CANCELLED, "the stream ended") from None
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        return core.stream_answer(response, time.perf_counter() - _oldest(self._sent))

    def answers(self, count: int) -> Iterator[StreamAnswer]:
        for _ in range(count):
            yield self.receive()

    def close(self) -> None:
        """End the request side; the server answers what is pending, then ends the stream."""
        self._requests.put(_END)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if exc is not None:
            self._responses.cancel()


class AsyncStream:
    """One ModelStreamInfer call on a grpc.aio channel; `async with`."""

    def __init__(self, stub: Any, metadata: Metadata = ()) -> None:
        self._call = stub.ModelStreamInfer(metadata=metadata)
        self._sent: queue.Queue[float] = queue.Queue()

    async def send(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
        sequence: SequenceStep | None = None,
    ) -> None:
        self._sent.put(time.perf_counter())
        request = core.infer_request(model, inputs, outputs, version, request_id, sequence=sequence)
        try:
            await self._call.write(request)
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None

    async def receive(self) -> StreamAnswer:
        try:
            response = await self._call.read()
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        if response is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise ClientError(grpc.StatusCode.CANCELLED, "the stream ended")
        return core.stream_answer(response, time.perf_counter() - _oldest(self._sent))

    async def close(self) -> None:
        await self._call.done_writing()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._call.cancel()
            return
        await self.close()


def _oldest(sent: queue.Queue[float]) -> float:
    # Answers come in completion order; the oldest send time is a fair estimate of latency.
    try:
        return sent.get_nowait()
    except queue.Empty:
        return time.perf_counter()
