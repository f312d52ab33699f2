"""The bare echo contender: a grpc.aio server that answers ModelInfer with prebuilt bytes.

The floor of any Python gRPC server on this machine, measured beside `mha serve`: one
process, one asyncio loop, gRPC built as `mha serve` builds it (its channel options, the
message limits among them, its concurrent-RPC limit and its default --freed-heap policy;
--server-arg does not reach the echo), and one generic handler whose methods take and
return raw bytes (request_deserializer=None, response_serializer=None): no protobuf work
per call. A ModelInfer answer is a serialized ModelInferResponse whose "output" tensor has
the request's query shape (B, L, E) in the model's float datatype (zeros,
raw_output_contents): as many bytes as `mha serve` sends back.

Reading the shape: answers are cached by the request's length in bytes. The first request
of each length is parsed once for its query shape (the bench's warm-up does this) and its
answer built; every later request costs one dict lookup. For the bench's requests a length
is one (B, L): one model, the same inputs, empty ids and raw contents, so the length grows
with B*L and with the digits of B and L. Two shapes of equal B*L that shared a length would
get answers of the same size, so the floor's cost would stay honest; only the shape field
would be the first one's.

With --protobuf the echo does per call what any Python server that reads the request must:
it parses the request (ModelInferRequest.FromString) and builds and serializes a fresh
response around prebuilt zero bytes. That is the floor of a Python OIP server that uses the
protobuf messages, and the breakdown in docs/performance.md measures it beside the bare one.

ModelStreamInfer answers each message on the stream with the same bytes wrapped as a
ModelStreamInferResponse (looked up by length the same way), in arrival order: the floor of
`mha bench decode`'s steps, which ignores sequence parameters and keeps no cache.

ServerLive, ServerReady, ModelReady and ModelMetadata answer too (from the model's mha.json),
so clients set up as they do against `mha serve`.

Run: python -m mha.bench.framework.echo --model-dir REPO/MODEL/VERSION --port 0 --port-file FILE
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from mha import contract
from mha.bench.framework.models import metadata_from_config, read_config
from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.core import memory
from mha.service.core.settings import Settings

# `mha serve`'s own options, so the two cannot drift apart; the module also loads ONNX
# Runtime, which costs the echo idle memory only.
from mha.service.grpc.server import grpc_options, write_port_file

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class Answers:
    """ModelInfer answers by request length: each length parsed once, then looked up."""

    def __init__(self, metadata: pb.ModelMetadataResponse) -> None:
        self.name = metadata.name
        self.version = metadata.versions[-1] if metadata.versions else ""
        outputs = {o.name: o.datatype for o in metadata.outputs}
        self.datatype = outputs.get(contract.OUTPUT, "FP32")
        self._by_length: dict[int, bytes] = {}
        self._streamed_by_length: dict[int, bytes] = {}

    def answer(self, request: bytes) -> bytes:
        """The serialized response for a serialized ModelInferRequest."""
        found = self._by_length.get(len(request))
        if found is None:
            found = self.build(pb.ModelInferRequest.FromString(request))
            self._by_length[len(request)] = found
        return found

    def streamed(self, request: bytes) -> bytes:
        """The serialized ModelStreamInferResponse carrying `answer(request)`."""
        found = self._streamed_by_length.get(len(request))
        if found is None:
            inner = pb.ModelInferResponse.FromString(self.answer(request))
            found = pb.ModelStreamInferResponse(infer_response=inner).SerializeToString()
            self._streamed_by_length[len(request)] = found
        return found

    def build(self, request: pb.ModelInferRequest, zeros: dict[int, bytes] | None = None) -> bytes:
        """Zeros of the query's shape (B, L, E) as the "output" tensor, serialized (the zero
        bytes from `zeros` by size when given, made there once)."""
        query = next((t for t in request.inputs if t.name == contract.QUERY), None)
        if query is None or len(query.shape) != 3:
            raise ValueError(f"want a {contract.QUERY!r} input of shape (B, L, E)")
        batch, length, width = query.shape
        size = batch * length * width * contract.DTYPES[self.datatype].itemsize
        raw = None if zeros is None else zeros.get(size)
        if raw is None:
            raw = bytes(size)
            if zeros is not None:
                zeros[size] = raw
        response = pb.ModelInferResponse(model_name=self.name, model_version=self.version,
                                         id=request.id)  # fmt: skip
        response.outputs.add(name=contract.OUTPUT, datatype=self.datatype, shape=query.shape)
        response.raw_output_contents.append(raw)
        return response.SerializeToString()


def _raw(behavior: Handler) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=None, response_serializer=None
    )


def _constant(answer: bytes) -> Handler:
    async def behavior(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return answer

    return behavior


def handler(metadata: pb.ModelMetadataResponse, protobuf: bool = False) -> grpc.GenericRpcHandler:
    """The service's methods, every one on raw bytes."""
    answers = Answers(metadata)
    zeros: dict[int, bytes] = {}

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            if protobuf:
                # parse the request, build and serialize a new response (zeros prebuilt)
                return answers.build(pb.ModelInferRequest.FromString(request), zeros)
            return answers.answer(request)
        except (DecodeError, ValueError, KeyError) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"echo: {err}")

    async def stream_infer(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            try:
                yield answers.streamed(request)
            except (DecodeError, ValueError, KeyError) as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"echo: {err}")

    def named(request: bytes) -> bool:  # ModelMetadataRequest and ModelReadyRequest alike
        return pb.ModelMetadataRequest.FromString(request).name == metadata.name

    async def model_metadata(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not named(request):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"echo serves {metadata.name!r} only")
        return metadata.SerializeToString()

    async def model_ready(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return pb.ModelReadyResponse(ready=named(request)).SerializeToString()

    yes = pb.ServerReadyResponse(ready=True).SerializeToString()  # the same bytes as live=True
    methods = {
        "ModelInfer": _raw(infer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream_infer, request_deserializer=None, response_serializer=None
        ),
        "ServerLive": _raw(_constant(pb.ServerLiveResponse(live=True).SerializeToString())),
        "ServerReady": _raw(_constant(yes)),
        "ModelReady": _raw(model_ready),
        "ModelMetadata": _raw(model_metadata),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def serve(
    version_dir: Path,
    host: str,
    port: int,
    port_file: Path | None,
    protobuf: bool = False,
    reuse_port: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT; write the bound port to port_file once listening."""
    settings = Settings()
    if settings.freed_heap == "keep":  # as `mha serve` does by default (core.memory)
        memory.keep_freed_heap(os.environ)
    server = grpc.aio.server(
        options=grpc_options(settings, reuse_port),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    metadata = metadata_from_config(read_config(version_dir))
    # Named as `mha serve` names it: by its folders in the repository (MODEL/VERSION).
    metadata.name = version_dir.parent.name
    metadata.versions[:] = [version_dir.name]
    server.add_generic_rpc_handlers((handler(metadata, protobuf),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("echo listening on %s:%d for %s", host, bound, version_dir)
    if port_file is not None:
        write_port_file(port_file, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    log.info("echo stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mha.bench.framework.echo", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="a version folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here")
    parser.add_argument(
        "--protobuf",
        action="store_true",
        help="parse each request and build each response (protobuf floor)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the port with other echo processes (SO_REUSEPORT), as frontends do",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(
        serve(args.model_dir, args.host, args.port, args.port_file, args.protobuf, args.reuse_port)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
