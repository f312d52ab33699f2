"""Shared memory between a frontend and the engine: one arena per direction, in slots.

An arena is an anonymous memory file (memfd_create) mapped by both processes: the writer
creates it and hands its file descriptor over the link's Unix socket, so there is no name
to leak when a process is killed (the memory goes when the last mapping does). Only the
writer allocates: it places a tensor's bytes in a slot (first fit, 64-byte aligned) and
sends the slot's offset and length in a frame; the reader reads a view of them and tells
the writer when it is done, and the writer frees the slot. Pages are given by the kernel on
first write and reused lowest-first, so the memory held tracks the bytes in flight.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import mmap
import os

ALIGN = 64


def slot_bytes(length: int) -> int:
    """The bytes a slot of `length` takes: a whole number of ALIGN, at least one."""
    return max(ALIGN, -(-length // ALIGN) * ALIGN)


class ArenaFull(Exception):
    """No free slot is large enough now (the writer waits for one, `Arena.place`)."""


class Arena:
    """A mapped memory file; `allocate`/`free` only on the writer's side."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.memory = mmap.mmap(fd, size)
        self.view = memoryview(self.memory)
        self._starts: list[int] = [0]  # free runs, sorted by start
        self._ends: dict[int, int] = {0: size}
        self._freed = asyncio.Event()

    @classmethod
    def create(cls, name: str, size: int) -> Arena:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def allocate(self, length: int) -> int:
        """The offset of a free slot of `length` bytes; ArenaFull when none is."""
        need = slot_bytes(length)
        for index, start in enumerate(self._starts):
            end = self._ends[start]
            if end - start >= need:
                del self._ends[start]
                if end - start == need:
                    del self._starts[index]
                else:
                    self._starts[index] = start + need
                    self._ends[start + need] = end
                return start
        raise ArenaFull(f"no free slot of {length} bytes in an arena of {self.size}")

    def free(self, offset: int, length: int) -> None:
        """Give a slot back, merged with free neighbours."""
        end = offset + slot_bytes(length)
        index = bisect.bisect(self._starts, offset)
        if index < len(self._starts) and self._starts[index] == end:  # merge the next run
            end = self._ends.pop(self._starts.pop(index))
        if index > 0 and self._ends[self._starts[index - 1]] == offset:  # into the previous
            self._ends[self._starts[index - 1]] = end
        else:
            self._starts.insert(index, offset)
            self._ends[offset] = end
        self._freed.set()

    async def place(self, data: bytes | memoryview) -> int:
        """Copy data into a new slot (waiting for room if the arena is full); its offset."""
        source = memoryview(data).cast("B")  # C-contiguous data, as bytes
        if len(source) > self.size:
            raise ValueError(f"{len(source)} bytes do not fit an arena of {self.size}")
        while True:
            try:
                offset = self.allocate(len(source))
                break
            except ArenaFull:
                self._freed.clear()
                await self._freed.wait()
        self.view[offset : offset + len(source)] = source
        return offset

    def read(self, offset: int, length: int) -> memoryview:
        return self.view[offset : offset + length]

    @property
    def free_bytes(self) -> int:
        return sum(self._ends[s] - s for s in self._starts)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a view still exported: the GC closes it
            self.memory.close()
        os.close(self.fd)
