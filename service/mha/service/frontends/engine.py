"""The engine process: the one DataPlane of the server, answering its frontends' links.

It owns what must be whole across frontends: the sessions (each model loaded once),
batching, admission, the sequences and their KV caches, statistics and /metrics. Readiness
(told to every frontend in `state` frames) is: every model version loaded, every frontend
connected, not stopping. A frontend that goes has its in-flight requests finished and
dropped, and the sequences of its streams ended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mha.service.core import logs, memory
from mha.service.core.dataplane import DataPlane
from mha.service.core.errors import ServiceError
from mha.service.core.settings import Settings
from mha.service.core.stats import Statistics, StatsMetrics
from mha.service.frontends import messages
from mha.service.frontends.arena import Arena
from mha.service.frontends.link import Frame, Link, receive_with_fd, send_with_fd

log = logging.getLogger(__name__)
ARENA_BYTES_PER_MESSAGE = 4  # an arena holds this many of the largest messages at once


def arena_bytes(settings: Settings) -> int:
    return ARENA_BYTES_PER_MESSAGE * settings.max_message_bytes


@dataclass
class Connection:
    """One frontend's link, its two arenas, and the stream sessions it has used."""

    index: int
    link: Link
    requests: Arena
    answers: Arena
    sessions: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Engine:
    def __init__(self, settings: Settings, frontends: int) -> None:
        self.settings = settings
        self.frontends = frontends
        self.metrics = StatsMetrics(Statistics())
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="mha-run")
        self.plane = DataPlane.create(settings, self.executor, self.metrics)
        self.connections: dict[int, Connection] = {}
        self.loaded = False
        self.stopping = False
        self.trimmer = memory.Trimmer()

    @property
    def ready(self) -> bool:
        connected = len(self.connections) == self.frontends
        return self.loaded and connected and not self.stopping

    def broadcast(self) -> None:
        served = [[name, version] for name, version in self.plane.table.served]
        state = {"t": "state", "ready": self.ready, "loaded": self.loaded,
                 "providers": self.plane.providers(), "served": served}  # fmt: skip
        for connection in self.connections.values():
            connection.link.send(state)

    async def accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(True)
            try:  # the frontend sends its hello right after connecting
                hello, fd = receive_with_fd(sock)
            except (OSError, ValueError) as err:
                log.warning("a frontend's handshake failed: %s", err)
                sock.close()
                continue
            task = asyncio.create_task(self.serve_frontend(sock, hello, fd))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def serve_frontend(self, sock: socket.socket, hello: Frame, fd: int) -> None:
        index = int(hello["frontend"])
        answers = Arena.create(f"mha-answers-{index}", arena_bytes(self.settings))
        send_with_fd(sock, {"t": "welcome"}, answers.fd)
        link = await Link.over(sock)
        connection = Connection(index, link, Arena(fd, int(hello["arena_bytes"])), answers)
        self.connections[index] = connection
        log.info("frontend %d connected (pid %s)", index, hello.get("pid"))
        self.broadcast()
        try:
            while (frame := await link.receive()) is not None:
                self.dispatch(connection, frame)
        except Exception:
            log.exception("frontend %d's link failed: dropping it", index)
        finally:
            if self.connections.get(index) is connection:  # not its restarted successor's
                del self.connections[index]
            link.close()
            log.warning("frontend %d disconnected", index)
            self.broadcast()
            await asyncio.gather(*connection.tasks, return_exceptions=True)
            for session in connection.sessions:
                self.plane.session_closed((index, session))
            connection.requests.close()
            connection.answers.close()

    def dispatch(self, connection: Connection, frame: Frame) -> None:
        kind = frame["t"]
        if kind == "infer":
            if frame["session"] is not None:
                connection.sessions.add(frame["session"])
            task = asyncio.create_task(self.infer(connection, frame))
            connection.tasks.add(task)
            task.add_done_callback(connection.tasks.discard)
        elif kind == "release":
            for offset, length in frame["slots"]:
                connection.answers.free(offset, length)
        elif kind == "closed":
            connection.sessions.discard(frame["session"])
            ended = self.plane.session_closed((connection.index, frame["session"]))
            if ended:
                log.info("stream %s closed: %d sequence(s) ended", frame["session"], ended)
        elif kind == "stats":
            connection.link.send(self.statistics(frame))

    def statistics(self, frame: Frame) -> Frame:
        try:
            figures = self.plane.statistics(frame["model"], frame["version"])
        except ServiceError as err:
            return messages.error_frame(frame["n"], err)
        rows = [(spec.name, spec.version, stats) for spec, stats in figures]
        return messages.statistics_frame(frame["n"], rows)

    async def infer(self, connection: Connection, frame: Frame) -> None:
        number = frame["n"]
        token = logs.request_id.set(frame["id"] or logs.new_request_id())
        try:
            request = messages.request_from(frame, connection.requests, connection.index)
            response = await self.plane.infer(request)
            answer = await messages.answer_frame(number, response, connection.answers)
        except ServiceError as err:
            answer = messages.error_frame(number, err)
        except Exception:
            log.exception("ModelInfer failed unexpectedly in the engine")
            answer = messages.error_frame(number, None)
        finally:
            logs.request_id.reset(token)
        connection.link.send(answer)

    async def housekeeping(self) -> None:
        """Evict idle sequences and return freed heap when idle, as a lone server does."""
        loop = asyncio.get_running_loop()
        period = max(0.05, min(self.settings.sequence_idle_seconds / 2, 5.0))
        while True:
            await asyncio.sleep(min(period, self.trimmer.idle_seconds / 2))
            self.plane.sequences.evict_idle()
            idle_for = 0.0 if self.plane.active else time.monotonic() - self.plane.last_call
            if self.trimmer.due(idle_for):
                await loop.run_in_executor(None, self.trimmer.run)

    async def run(self, listener: socket.socket, metrics_port_file: Path | None) -> None:
        """Serve until SIGTERM (sent by the supervisor once every frontend has stopped)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        settings = self.settings
        if settings.metrics_port is not None:
            port = self.metrics.serve(settings.host, settings.metrics_port)
            log.info("metrics on http://%s:%d/metrics", settings.host, port)
            if metrics_port_file is not None:  # atomically, as the lone server writes it
                metrics_port_file.with_suffix(".tmp").write_text(f"{port}\n")
                os.replace(metrics_port_file.with_suffix(".tmp"), metrics_port_file)
        accepting = asyncio.create_task(self.accept(listener))
        chores = asyncio.create_task(self.housekeeping())
        loading = asyncio.create_task(self.plane.load_all())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if loading.done():
                count = loading.result()
                await loop.run_in_executor(None, self.trimmer.run)
                self.loaded = True
                log.info("engine ready: %d model version(s) loaded", count)
                self.broadcast()
                await stopping
        finally:
            self.stopping = True
            self.broadcast()
            for task in (loading, stopping, accepting, chores):
                task.cancel()
            self.plane.refuse_new()
            await self.plane.close()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.metrics.shutdown()
            totals = self.metrics.statistics.totals()
            log.info("engine stopped: %d requests answered, %d refused", *totals)
