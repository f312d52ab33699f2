"""A frontend process: the lone server's gRPC side (mha.service.grpc.server.Server) over a
RemotePlane, on the port every frontend shares.

It connects to the engine, hands over its request arena and receives the engine's answer
arena (link handshake), then serves as `mha serve` does: TLS and token files reloaded in
this process, readiness as the engine tells it, drain and grace on SIGTERM. When the engine
goes it answers NOT_SERVING, fails what is in flight UNAVAILABLE, stops and exits with
ENGINE_LOST, so the supervisor knows not to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from mha.service.core import repository
from mha.service.core.models import ModelTable
from mha.service.core.settings import Settings
from mha.service.frontends.arena import Arena
from mha.service.frontends.engine import arena_bytes
from mha.service.frontends.link import Link, receive_with_fd, send_with_fd
from mha.service.frontends.remote import RemotePlane
from mha.service.grpc import server as grpc_server

log = logging.getLogger(__name__)
ENGINE_LOST = 3  # exit code of a frontend whose engine went away


def identity(index: int) -> str:
    """The ServerMetadata extension that names the frontend which answered (index/pid)."""
    return f"frontend:{index}/{os.getpid()}"


async def connect(settings: Settings, index: int, engine_socket: Path) -> RemotePlane:
    """Connect to the engine and exchange arenas; the plane, not yet reading."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(engine_socket))
    requests = Arena.create(f"mha-requests-{index}", arena_bytes(settings))
    hello = {"t": "hello", "frontend": index, "arena_bytes": requests.size, "pid": os.getpid()}
    send_with_fd(sock, hello, requests.fd)
    _welcome, fd = receive_with_fd(sock)
    answers = Arena(fd, arena_bytes(settings))
    table = ModelTable(repository.scan(settings.repository))
    return RemotePlane(table, await Link.over(sock), requests, answers)


async def run(settings: Settings, index: int, engine_socket: Path) -> int:
    """Serve until SIGTERM or the engine's end; the process's exit code."""
    plane = await connect(settings, index, engine_socket)
    server = grpc_server.Server(
        settings, plane=plane, reuse_port=True, extensions=(identity(index),)
    )
    stop = asyncio.Event()
    plane.on_lost = stop.set

    updates: set[asyncio.Task[None]] = set()

    def follow(ready: bool) -> None:
        if server.draining or plane.lost or plane.started:
            update = asyncio.create_task(server.health.set_ready(ready and not server.draining))
            updates.add(update)
            update.add_done_callback(updates.discard)

    plane.on_state = follow
    receiving = asyncio.create_task(plane.receive(), name="engine-link")
    try:
        await grpc_server.serve(settings, server, stop)
    except Exception:
        if not plane.lost:
            raise
    finally:
        receiving.cancel()
    return ENGINE_LOST if plane.lost else 0
