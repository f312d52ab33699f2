"""Execution providers and CPU threads: what ONNX Runtime may use in this container.

A container limited to 2 CPUs on a 64-core host still sees os.cpu_count() == 64; 64
intra-op threads on a 2-CPU quota thrash. So the default thread count comes from the
cgroup CPU quota (v2 cpu.max, else v1 cpu.cfs_quota_us / cpu.cfs_period_us).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mha.service.core.errors import StartupError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# use_tf32=0: TF32 matmuls (Ampere+) would miss the fp32 parity the export proved (1e-5).
# kSameAsRequested: shapes vary per request, so grow the GPU arena by what a run needs,
# not by powers of two.
CUDA_OPTIONS: dict[str, Any] = {
    "device_id": 0,
    "use_tf32": 0,
    "arena_extend_strategy": "kSameAsRequested",
}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup allows (quota / period), or None when unlimited or unknown."""
    v2 = _read(root / "cpu.max")  # "max 100000" or "200000 100000"
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            return int(parts[0]) / int(parts[1])
        return None
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return int(quota) / int(period) if int(quota) > 0 else None
    return None


def default_threads(root: Path = CGROUP_ROOT, cpu_count: int | None = None) -> int:
    """Intra-op threads: the CPU quota rounded up, at most the visible cores, at least 1."""
    cores = cpu_count or os.cpu_count() or 1
    quota = cpu_quota(root)
    if quota is None:
        return cores
    return max(1, min(cores, math.ceil(quota)))


@dataclass(frozen=True)
class DevicePlan:
    """The providers to ask ONNX Runtime for, and the one that must end up first."""

    providers: tuple[str, ...]
    options: tuple[dict[str, Any], ...] = field(default=())
    strict: bool = False  # cuda asked explicitly: a fallback is an error, not a warning

    @property
    def wanted(self) -> str:
        return self.providers[0]


def plan(device: str, available: Sequence[str]) -> DevicePlan:
    """Choose providers for --device auto|cpu|cuda given ORT's available providers."""
    if device == "cpu":
        return DevicePlan((CPU,), ({},))
    if CUDA in available:
        return DevicePlan((CUDA, CPU), (dict(CUDA_OPTIONS), {}), strict=device == "cuda")
    if device == "cuda":
        raise StartupError(
            f"--device cuda: ONNX Runtime has no {CUDA} (available: {', '.join(available)}); "
            "install onnxruntime-gpu (and not onnxruntime) on a machine with a CUDA GPU, or "
            "use --device cpu"
        )
    log.warning("--device auto: no %s in ONNX Runtime, serving on %s", CUDA, CPU)
    return DevicePlan((CPU,), ({},))


def check_session_providers(device_plan: DevicePlan, in_use: Sequence[str], model: str) -> str:
    """The provider a session really uses; StartupError if ORT fell back when it must not."""
    actual = in_use[0] if in_use else CPU
    if actual == device_plan.wanted:
        return actual
    message = (
        f"model {model}: asked ONNX Runtime for {device_plan.wanted}, the session uses "
        f"{', '.join(in_use)} (ONNX Runtime falls back silently when the provider fails)"
    )
    if device_plan.strict:
        raise StartupError(message)
    log.warning("%s; serving on %s", message, actual)
    return actual
