"""Resident memory: keep freed heap for reuse while busy, give it back once idle.

Every large request passes through several buffers of its size (gRPC's, the bytes object of
the message, the answer, gRPC's copy of it). glibc serves a buffer over its mmap threshold
with a fresh mapping, one page fault per 4 KiB touched, and returns the top of a heap to the
system once more than its trim threshold is free there; its dynamic thresholds follow the
largest chunk freed so far, so under steady large requests buffers keep coming back fresh.
With --freed-heap keep (the default, `keep_freed_heap`) buffers up to MMAP_THRESHOLD come
from the heap and up to TRIM_THRESHOLD of free heap stays at a heap's top for the next
request: (8,128) requests (2 MiB in and out) faulted 77-148 pages instead of ~2,850 with
--no-compute, which answered 2.7x the requests a second, and the full server answered
96-104 req/s against 65-82 under glibc's own thresholds, whose fault rate depends on the
process's history. The price is memory under bursts: about twice the resident memory
while 600 large requests are in flight (docs/performance.md). `--freed-heap return` leaves
glibc's defaults.

Freed heap that stays resident is given back when the server is idle (`Trimmer`):
`malloc_trim(0)` returns every arena's free pages; it is called when the server has been idle
for IDLE_SECONDS and resident memory grew by GROWTH_BYTES since the last trim (so a steady
load never pays for it, and an idle server does not trim in a loop). Forcing large buffers to
mmap instead (a low M_MMAP_THRESHOLD) was not chosen: on the machine measured that made a
32 MB copy 24-40x slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

IDLE_SECONDS = 0.5
GROWTH_BYTES = 32 * 1024 * 1024
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
# glibc's own largest dynamic trim threshold (2 x its largest mmap threshold): malloc_trim
# returns the main heap's free top but not a thread arena's, which stays up to this size.
TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A glibc function by name, or None where the C library lacks it (musl, macOS)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = ctypes.CDLL(library)[name]
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim", ctypes.c_size_t)


def keep_freed_heap(environ: Mapping[str, str]) -> bool:
    """Have glibc serve buffers up to MMAP_THRESHOLD from the heap and keep up to
    TRIM_THRESHOLD of it free for reuse (process-wide). False, changing nothing, where the
    C library is not glibc or the environment already tunes glibc's malloc (its variables
    win: an operator who set them meant them)."""
    tuned = [name for name in _MALLOC_VARIABLES if name in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        log.info("freed heap: left to the environment's %s", ", ".join(tuned))
        return False
    mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        log.info("freed heap: not glibc, its malloc keeps its own thresholds")
        return False
    # mallopt returns 1 on success; setting either threshold by hand also ends glibc's
    # adjusting of both to the largest chunk freed.
    kept = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
    if kept:
        log.info(
            "freed heap: kept for reuse (buffers up to %d MiB from the heap, up to %d MiB "
            "free kept; trimmed when idle)", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20,
        )  # fmt: skip
    else:
        log.warning("freed heap: glibc refused the thresholds; its own stay")
    return kept


class Trimmer:
    """Decides when to trim: `due` is asked periodically with the idle time, `run` trims."""

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
