"""RemotePlane: the data plane's interface in a frontend, answered by the engine.

The servicer and the streams call it as they call a DataPlane. Model specs come from the
frontend's own scan of the repository (mha.json files; no session is loaded here), so
ModelMetadata and the model lookups never cross the link; inference, statistics and the
end of a stream's sequences do. When the engine goes, every call in flight and every later
one is UNAVAILABLE and `on_lost` tells the frontend's server to stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

from mha.service.core.errors import Unavailable
from mha.service.core.inference import InferRequest, InferResponse
from mha.service.core.models import ModelTable
from mha.service.core.repository import ModelSpec
from mha.service.core.stats import VersionStats
from mha.service.frontends import messages
from mha.service.frontends.arena import Arena
from mha.service.frontends.link import Frame, Link

log = logging.getLogger(__name__)
ENGINE_GONE = "the server's engine stopped; send the request again (the server restarts)"


class RemotePlane:
    """The engine's data plane seen from one frontend (event loop only, no locks)."""

    def __init__(self, table: ModelTable, link: Link, requests: Arena, answers: Arena) -> None:
        self.table = table
        self.link = link
        self.requests = requests  # this frontend writes, the engine reads
        self.answers = answers  # the engine writes, this frontend reads
        self.active = 0
        self.last_call = 0.0
        self.refusing = False
        self.lost = False
        self.state: Frame = {"ready": False, "providers": [], "served": []}
        self.on_state: Callable[[bool], None] = lambda ready: None
        self.on_lost: Callable[[], None] = lambda: None
        self._calls: dict[int, asyncio.Future[Frame]] = {}
        self._number = 0
        self._released: list[list[int]] = []
        self._held: dict[int, list[tuple[int, int]]] = {}  # request slots the engine reads
        self._loaded = asyncio.Event()

    # -- the engine's frames ------------------------------------------------------------------
    async def receive(self) -> None:
        """Read the engine's frames until the link ends, then fail what is left."""
        while (frame := await self.link.receive()) is not None:
            kind = frame["t"]
            for offset, length in self._held.pop(frame.get("n", 0), ()):  # its reads ended
                self.requests.free(offset, length)
            if kind == "state":
                self.state = frame
                if frame["ready"]:  # loaded, and every frontend connected
                    self._loaded.set()
                self.on_state(self.ready)
            elif (call := self._calls.pop(frame["n"], None)) is not None and not call.done():
                call.set_result(frame)
            elif kind == "answer":  # its caller went away: the slots go back at once
                self._release([(o[3], o[4]) for o in frame["outputs"]])
        self.lost = True
        self._held.clear()
        log.error("the engine is gone: NOT_SERVING, stopping")
        for call in self._calls.values():
            if not call.done():
                call.set_exception(Unavailable(ENGINE_GONE))
        self._loaded.set()
        self.on_state(False)
        self.on_lost()

    async def _call(self, frame: Frame) -> Frame:
        if self.lost:
            raise Unavailable(ENGINE_GONE)
        call = asyncio.get_running_loop().create_future()
        self._calls[frame["n"]] = call
        self.link.send(frame)
        return await call

    def _next(self) -> int:
        self._number += 1
        return self._number

    def _release(self, slots: list[tuple[int, int]]) -> None:
        if not self._released:
            asyncio.get_running_loop().call_soon(self._send_released)
        self._released += [list(slot) for slot in slots]

    def _send_released(self) -> None:
        released, self._released = self._released, []
        self.link.send({"t": "release", "slots": released})

    # -- the data plane's interface -----------------------------------------------------------
    @property
    def started(self) -> bool:
        """The engine has been ready once (load_all returned)."""
        return self._loaded.is_set()

    @property
    def ready(self) -> bool:
        return bool(self.state["ready"]) and not self.lost

    def refuse_new(self) -> None:
        self.refusing = True

    async def load_all(self) -> int:
        """Wait until the engine is ready (every model version loaded, every frontend
        connected); return how many versions it serves."""
        await self._loaded.wait()
        if self.lost:
            raise Unavailable(ENGINE_GONE)
        return len(self.state["served"])

    async def close(self) -> None:
        self.link.close()

    def model(self, name: str, version: str = "") -> ModelSpec:
        return self.table.resolve(name, version)

    def versions(self, name: str) -> list[int]:
        return self.table.versions(name)

    def model_ready(self, name: str, version: str = "") -> bool:
        spec = self.table.resolve(name, version)
        return [spec.name, spec.version] in self.state["served"]

    def providers(self) -> list[str]:
        return list(self.state["providers"])

    def session_closed(self, session: Hashable) -> int:
        """A stream ended: the engine ends its sequences (the count stays in its log).
        Sent at once: the frame is in the engine's socket before the client sees the end."""
        if not self.lost:
            self.link.send_now({"t": "closed", "session": str(session)})
        return 0

    async def statistics(
        self, name: str = "", version: str = ""
    ) -> list[tuple[ModelSpec, VersionStats]]:
        frame = {"t": "stats", "n": self._next(), "model": name, "version": version}
        answer = await self._call(frame)
        if answer["t"] == "error":
            raise messages.error_from(answer)
        rows = messages.statistics_from(answer)
        return [(self.table.resolve(n, str(v)), stats) for n, v, stats in rows]

    async def infer(self, request: InferRequest) -> InferResponse:
        """One request through the engine. The answer's arrays are views of the answer
        arena, valid until the caller next awaits (the servicer encodes them first)."""
        self.active += 1
        self.last_call = time.monotonic()
        number = self._next()
        try:
            if self.refusing:
                raise Unavailable("the server is shutting down; send the request again")
            if self.lost:
                raise Unavailable(ENGINE_GONE)
            frame, slots = await messages.request_frame(number, request, self.requests)
            # Freed when the engine answers, even if this caller has gone by then.
            self._held[number] = slots
            answer = await self._call(frame)
        finally:
            self.active -= 1
        if answer["t"] == "error":
            raise messages.error_from(answer)
        response, answer_slots = messages.response_from(answer, self.answers)
        self._release(answer_slots)  # runs after this turn: the caller encodes before it
        return response
