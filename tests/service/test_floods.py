"""Many calls at once on one connection: each answered OK or refused with a reason.

gRPC core keeps calls the asyncio server has not picked up yet in a backlog that CANCELs them
at random past 1,000 (all past 3,000) by default; the server sets that backlog out of the way
so its own limits answer instead (mha.service.grpc.server.grpc_options).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
from service_helpers import RunningServer, settings_for

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc

CALLS = 3000


async def _burst(port: int) -> Counter[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one() -> str:
            try:
                await stub.ServerLive(pb.ServerLiveRequest(), timeout=120)
                return "OK"
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name}: {err.details()}"

        return Counter(await asyncio.gather(*(one() for _ in range(CALLS))))


def _burst_answers(repository: Path, max_concurrent_rpcs: int) -> Counter:
    server = RunningServer(settings_for(repository, max_concurrent_rpcs=max_concurrent_rpcs))
    server.load()
    try:
        return asyncio.run(_burst(server.port))
    finally:
        server.close()


def test_a_burst_on_one_connection_is_never_cancelled(repository: Path):
    answers = _burst_answers(repository, max_concurrent_rpcs=0)
    assert answers == Counter({"OK": CALLS})


def test_past_the_rpc_limit_calls_are_refused_saying_so(repository: Path):
    answers = _burst_answers(repository, max_concurrent_rpcs=8)
    assert set(answers) <= {"OK", "RESOURCE_EXHAUSTED: Concurrent RPC limit exceeded!"}, answers
    assert answers["OK"] >= 8
