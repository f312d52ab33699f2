"""The link between a frontend and the engine: frames on a Unix socket, tensors in arenas.

A frame is a 4-byte little-endian length and a JSON object: metadata only (names, shapes,
parameters, slot offsets). Tensor bytes travel in the sender's arena (mha.service.frontends
.arena), never in a frame and never pickled. Frames sent during one turn of the event loop
go out in one write, so concurrent requests share a system call.

The handshake is the one exchange on a blocking socket: each side sends its first frame with
its arena's file descriptor (SCM_RIGHTS), then both wrap the socket in asyncio streams.

Frames, frontend -> engine: hello, infer, release (answer slots read), closed (a stream's
session ended), stats. Engine -> frontend: welcome, state (readiness, providers, loaded
versions), answer, error, stats.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

Frame = dict[str, Any]
_LENGTH = struct.Struct("<I")
HANDSHAKE_BYTES = 1 << 16
HANDSHAKE_SECONDS = 10.0


def encode(frame: Frame) -> bytes:
    body = json.dumps(frame, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def send_with_fd(sock: socket.socket, frame: Frame, fd: int) -> None:
    """Send one frame with a file descriptor beside it (blocking socket)."""
    socket.send_fds(sock, [encode(frame)], [fd])


def receive_with_fd(sock: socket.socket) -> tuple[Frame, int]:
    """Receive one frame and the file descriptor sent with it (blocking socket)."""
    sock.settimeout(HANDSHAKE_SECONDS)
    data, fds, _flags, _address = socket.recv_fds(sock, HANDSHAKE_BYTES, 1)
    if not fds or len(data) < _LENGTH.size:
        raise ConnectionError("the link's handshake carried no arena")
    (length,) = _LENGTH.unpack_from(data)
    if len(data) != _LENGTH.size + length:
        raise ConnectionError("the link's handshake frame arrived in pieces")
    sock.settimeout(None)
    return json.loads(data[_LENGTH.size :]), fds[0]


class Link:
    """Frames over asyncio streams; `send` queues, one write per event loop turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._pending: list[bytes] = []
        self.closed = False

    @classmethod
    async def over(cls, sock: socket.socket) -> Link:
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, frame: Frame) -> None:
        if self.closed:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(encode(frame))

    def send_now(self, frame: Frame) -> None:
        """Send at once, with what is queued (in the socket before the caller goes on)."""
        if not self.closed:
            self._pending.append(encode(frame))
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not self.closed and pending:
            self.writer.write(b"".join(pending))

    async def receive(self) -> Frame | None:
        """The next frame; None when the other side has gone."""
        try:
            header = await self.reader.readexactly(_LENGTH.size)
            body = await self.reader.readexactly(_LENGTH.unpack(header)[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        frame: Frame = json.loads(body)
        return frame

    def close(self) -> None:
        self._flush()
        self.closed = True
        self.writer.close()
