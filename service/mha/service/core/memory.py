"""Resident memory: give freed heap back to the system once the server is idle.

Large requests (a 64 MiB message passes through gRPC's buffer, a Python bytes object and the
parsed message) leave glibc's heaps with free memory it keeps resident: each thread that
allocated has its own arena, and after a large chunk is freed glibc raises its mmap threshold,
so the next large buffers come from those arenas too. Resident memory then stays at the
burst's high-water mark. `malloc_trim(0)` returns every arena's free pages; it is called when
the server has been idle for IDLE_SECONDS and resident memory grew by GROWTH_BYTES since the
last trim (so a steady load never pays for it, and an idle server does not trim in a loop).
Forcing large buffers to mmap instead (M_MMAP_THRESHOLD) was not chosen: fresh pages cost a
page fault each, and on the machine measured that made a 32 MB copy 24-40x slower. Nor the
opposite, glibc keeping freed heap for reuse under load: faster at steady large requests, but
a burst's high-water mark stays (docs/performance.md, "What did not pay").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

IDLE_SECONDS = 0.5
GROWTH_BYTES = 32 * 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


class Trimmer:
    """Decides when to trim; `maybe_trim` is called periodically with the idle time."""

    def __init__(self, growth_bytes: int = GROWTH_BYTES, idle_seconds: float = IDLE_SECONDS):
        self.growth_bytes = growth_bytes
        self.idle_seconds = idle_seconds
        self.trim = _malloc_trim()
        self.baseline = resident_bytes()
        self.trims = 0

    def due(self, idle_for: float) -> bool:
        if self.trim is None or idle_for < self.idle_seconds:
            return False
        return resident_bytes() - self.baseline > self.growth_bytes

    def run(self) -> tuple[int, int]:
        """Trim now (blocking, a few ms); resident bytes before and after."""
        before = resident_bytes()
        if self.trim is not None:
            self.trim(0)
        after = resident_bytes()
        self.baseline = after
        self.trims += 1
        log.info("memory trimmed: resident %.0f -> %.0f MB", before / 2**20, after / 2**20)
        return before, after
