"""How `mha bench flood` sends: bursts fired at once on one channel, a random run, one probe.

Requests travel as bytes (a unary_unary call with no serializer, as mha.bench.loadgen
does), so the random run can send what no protobuf encoder would, and a burst's request
is serialized once. A burst starts every call before it reads any answer, all on ONE
grpc.aio channel (one HTTP/2 connection): what a single busy client does. Each answer
keeps its status code, details and latency from the moment its call was started, so it
includes the time its bytes waited behind the rest of the burst on that one connection
(600 requests of (8,128) fp32 are 1.2 GB: the last cannot reach the server, nor be refused
by it, before most of those bytes went through).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np

from mha import contract
from mha.bench.flood_requests import RandomRequests, Shapes, encode
from mha.bench.loadgen import MODEL_INFER
from mha.client.core import channel_options

CONNECT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 1 << 30  # the client's own limit: the server's is what is measured


class FloodFailed(RuntimeError):
    """The bench could not send at all (no connection): no figure would mean anything."""


@dataclass(frozen=True)
class Answer:
    kind: str  # what was sent: "burst", "probe" or a random kind (mha.bench.flood_requests)
    code: str  # "OK" or the grpc.StatusCode name
    details: str
    seconds: float


@dataclass(frozen=True)
class Fired:
    answers: list[Answer]
    wall_s: float  # first call started -> last answer


async def _send(call: Callable[..., Any], body: bytes, kind: str, timeout: float | None) -> Answer:
    began = time.perf_counter()
    try:
        await call(body, timeout=timeout)
        code, details = "OK", ""
    except grpc.aio.AioRpcError as err:
        code, details = err.code().name, err.details() or ""
    return Answer(kind, code, details, time.perf_counter() - began)


@contextlib.asynccontextmanager
async def model_infer(url: str) -> AsyncIterator[Callable[..., Any]]:
    """ModelInfer on a fresh channel, bytes in and out; FloodFailed if it cannot connect."""
    options = channel_options(MAX_MESSAGE_BYTES)
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise FloodFailed(f"{url}: no connection in {CONNECT_TIMEOUT_S:g} s") from None
        yield channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)


def query_request(shapes: Shapes, batch: int, length: int, seed: int = 0) -> bytes:
    """A valid request: query [B, L, E] of seeded standard-normal values, raw contents."""
    dtype = contract.DTYPES[shapes.datatype]
    shape = [batch, length, shapes.width]
    raw = np.random.default_rng(seed).standard_normal(shape).astype(dtype).tobytes()
    return encode(shapes.model, [(contract.QUERY, shapes.datatype, shape, raw)]).SerializeToString()


def burst(url: str, body: bytes, count: int, timeout: float | None) -> Fired:
    """`count` calls of one request on one channel, every one started before any answer."""

    async def run() -> Fired:
        async with model_infer(url) as call:
            began = time.perf_counter()
            calls = [_send(call, body, "burst", timeout) for _ in range(count)]
            answers = await asyncio.gather(*calls)
            return Fired(list(answers), time.perf_counter() - began)

    return asyncio.run(run())


def random_run(
    url: str, requests: RandomRequests, indices: Iterable[int], concurrency: int, timeout: float
) -> Fired:
    """The requests of `indices`, at most `concurrency` in flight, on one channel."""

    async def run() -> Fired:
        todo = iter(indices)  # shared by the workers: each index is sent once
        answers: list[Answer] = []

        async def worker(call: Callable[..., Any]) -> None:
            for index in todo:
                kind, body = requests.make(index)
                answers.append(await _send(call, body, kind, timeout))

        async with model_infer(url) as call:
            began = time.perf_counter()
            await asyncio.gather(*(worker(call) for _ in range(concurrency)))
            return Fired(answers, time.perf_counter() - began)

    return asyncio.run(run())


def probe(url: str, body: bytes, timeout: float = 10.0) -> Answer:
    """One good request on a fresh channel: does the server still answer?"""

    async def run() -> Answer:
        async with model_infer(url) as call:
            return await _send(call, body, "probe", timeout)

    try:
        return asyncio.run(run())
    except FloodFailed as err:
        return Answer("probe", "NO_CONNECTION", str(err), float("nan"))
