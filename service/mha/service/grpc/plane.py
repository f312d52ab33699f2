"""What the servicer, the streams and the server call: a data plane's interface.

Two planes have it: the lone server's DataPlane (mha.service.core.dataplane) and a
frontend's RemotePlane (mha.service.frontends.remote), answered by the engine process.
Statistics may be awaitable (the remote one asks the engine).
"""

from __future__ import annotations

from collections.abc import Awaitable, Hashable
from typing import Protocol

from mha.service.core.inference import InferRequest, InferResponse
from mha.service.core.repository import ModelSpec
from mha.service.core.stats import VersionStats

Figures = list[tuple[ModelSpec, VersionStats]]


class Plane(Protocol):
    active: int  # infer calls in progress
    last_call: float  # time.monotonic() of the latest infer call

    @property
    def ready(self) -> bool: ...

    def refuse_new(self) -> None: ...

    async def load_all(self) -> int: ...

    async def close(self) -> None: ...

    def model(self, name: str, version: str = "") -> ModelSpec: ...

    def versions(self, name: str) -> list[int]: ...

    def model_ready(self, name: str, version: str = "") -> bool: ...

    def providers(self) -> list[str]: ...

    def session_closed(self, session: Hashable) -> int: ...

    def statistics(self, name: str = "", version: str = "") -> Figures | Awaitable[Figures]: ...

    async def infer(self, request: InferRequest) -> InferResponse: ...
