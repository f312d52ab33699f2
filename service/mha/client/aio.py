"""The asyncio client: the core's Calls awaited on one grpc.aio channel."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from mha.client import core
from mha.client import security as security_module
from mha.client.core import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Call,
    ClientError,
    InferResult,
    SequenceStep,
)
from mha.client.security import Security
from mha.client.streams import AsyncStream
from mha.proto import grpc_predict_v2_pb2 as pb


class AsyncClient:
    """asyncio client over one grpc.aio channel; `async with` or await close()."""

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: Security | None = None,
    ) -> None:
        """security: TLS (mTLS) and the bearer token for a secured server (client.security)."""
        self.url = url
        self.timeout = timeout
        self._metadata = security.metadata() if security is not None else ()
        options = core.channel_options(max_message_bytes)
        self._channel = security_module.aio_channel(url, options, security)
        self._stubs = core.stubs(self._channel)

    async def run(self, call: Call, timeout: float | None = None) -> Any:
        """Send one Call and read its answer; ClientError if the RPC fails."""
        method = getattr(self._stubs[call.stub], call.method)
        start = time.perf_counter()
        try:
            pending = method(
                call.request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
            response = await pending
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        return call.read(response, time.perf_counter() - start)

    async def live(self) -> bool:
        return bool(await self.run(core.live()))

    async def ready(self) -> bool:
        return bool(await self.run(core.ready()))

    async def model_ready(self, name: str, version: str = "") -> bool:
        return bool(await self.run(core.model_ready(name, version)))

    async def server_metadata(self) -> pb.ServerMetadataResponse:
        return await self.run(core.server_metadata())

    async def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        return await self.run(core.model_metadata(name, version))

    async def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return await self.run(core.statistics(name, version))

    async def health(self, service: str = "") -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... (NOT_FOUND if unknown)."""
        return str(await self.run(core.health(service)))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
        timeout: float | None = None,
        typed: bool = False,
        sequence: SequenceStep | None = None,
    ) -> InferResult:
        """Run one ModelInfer; inputs by tensor name (query [B, L, E], ...).

        sequence: the sequence this request is a step of (a model exported --kv-cache).
        """
        call = core.infer(model, inputs, outputs, version, request_id, typed, sequence)
        return await self.run(call, timeout)  # type: ignore[no-any-return]

    def stream(self) -> AsyncStream:
        """A ModelStreamInfer stream on this channel (mha.client.streams)."""
        return AsyncStream(self._stubs[core.INFERENCE], self._metadata)

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
