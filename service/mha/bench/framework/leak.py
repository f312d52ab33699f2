"""Run an `mha` command with a leak: memory held at a steady rate, never given back.

    python -m mha.bench.framework.leak MB_PER_S serve --repository ... (any `mha` arguments)

The soak's check of its own verdict: the same `mha serve`, in the same process, with a
thread that touches and keeps MB_PER_S megabytes (10**6 bytes) each second, up to LIMIT_MB,
so its resident memory climbs the way a leak's does. Nothing else differs from `mha serve`.
"""

from __future__ import annotations

import sys
import threading

from mha.cli import main

TICK_S = 0.05  # a leak in small steps, so a short soak sees a climb, not a jump
LIMIT_MB = 4096  # it stops by itself


def leak(mb_per_s: float, stop: threading.Event) -> list[bytearray]:
    """Start the leaking thread; the list it fills (held for the process's life)."""
    held: list[bytearray] = []
    step = max(1, int(mb_per_s * 1e6 * TICK_S))

    def run() -> None:
        while not stop.wait(TICK_S) and len(held) * step < LIMIT_MB * 1e6:
            held.append(bytearray(b"\xa5") * step)  # written, so every page is resident

    threading.Thread(target=run, name="leak", daemon=True).start()
    return held


if __name__ == "__main__":
    rate, argv = float(sys.argv[1]), sys.argv[2:]
    kept = leak(rate, threading.Event())
    sys.exit(main(argv))
