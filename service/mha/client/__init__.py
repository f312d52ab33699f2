"""An Open Inference Protocol gRPC client: `Client` (blocking) and `AsyncClient` (asyncio).

from mha.client import Client
with Client("localhost:8001") as client:
    result = client.infer("mha", {"query": query})  # result.outputs["output"]

A secured server: Client(url, security=Security(ca_file=..., token_file=...)).
"""

from mha.client.aio import AsyncClient
from mha.client.core import ClientError, InferResult, SequenceStep, StreamAnswer
from mha.client.security import Security
from mha.client.streams import AsyncStream, Stream
from mha.client.sync import Client

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Client",
    "ClientError",
    "InferResult",
    "Security",
    "SequenceStep",
    "Stream",
    "StreamAnswer",
]
