"""What `mha bench serve` measures: workloads, configurations, presets, request pools.

A workload is a request shape: B samples of query length L, fixed ("1x128") or drawn
uniformly from a range ("1x16-256", the length mix). A point is one measurement: a
configuration (server with batching on/off, the no-compute floor, the bare echo server,
in-process ONNX Runtime, or an external server) under one workload at one concurrency or
arrival rate. A preset with Goals also says where its PASS/MISS targets apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mha.client.inputs import Sizes, random_inputs
from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.grpc import codec

# The project's server, started by the bench; frontends-N: --frontends N (batching on).
SERVER_CONFIGS = ("on", "off", "floor", "frontends-1", "frontends-2", "frontends-default")
# echo: mha.bench.framework.echo, the bare floor; echo-2: two of it on one port (the bound
# of two frontends)
STARTED_CONFIGS = (*SERVER_CONFIGS, "echo", "echo-2")
CONFIGS = (*STARTED_CONFIGS, "inprocess", "external")
_WORKLOAD = re.compile(r"^(\d+)x(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class Workload:
    batch: int
    low: int  # query length L (= S for self-attention), or the bottom of the range
    high: int  # == low for a fixed shape

    @classmethod
    def parse(cls, text: str) -> Workload:
        """ "1x128" (B=1, L=128) or "1x16-256" (L uniform in [16, 256])."""
        match = _WORKLOAD.match(text.strip())
        if not match:
            raise ValueError(f"workload {text!r}: expected BxL or BxLO-HI, e.g. 1x128, 1x16-256")
        batch, low = int(match[1]), int(match[2])
        high = int(match[3]) if match[3] else low
        if batch < 1 or low < 1 or high < low:
            raise ValueError(f"workload {text!r}: need B >= 1 and 1 <= LO <= HI")
        return cls(batch, low, high)

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.low}" + (f"-{self.high}" if self.high != self.low else "")

    @property
    def is_mix(self) -> bool:
        return self.high != self.low


@dataclass(frozen=True)
class Point:
    config: str
    workload: Workload
    concurrency: int = 1  # closed-loop clients (in-process: calling threads)
    rate: float = 0.0  # open loop requests/s; 0 = closed loop
    merge: int = 1  # in-process only: requests merged into one session run (best-batch sweep)

    @property
    def label(self) -> str:
        load = f"rate {self.rate:g}/s" if self.rate else f"c={self.concurrency}"
        merged = f" batch {self.merge}" if self.merge > 1 else ""
        return f"{self.config} {self.workload.name} {load}{merged}"


@dataclass(frozen=True)
class Timing:
    duration_s: float = 3.0
    warmup_s: float = 0.5
    sweep_duration_s: float = 1.5  # each batch size of the in-process best-batch sweep
    max_requests: int = 0


@dataclass(frozen=True)
class Goals:
    """Where the PASS/MISS targets apply (bounds.goal_targets): shapes and client counts."""

    floor_shapes: tuple[str, ...] = ("1x16", "1x128")  # --no-compute vs echo
    server_shapes: tuple[str, ...] = ("1x16", "1x128", "8x128")  # batching on vs the bound
    batching_shapes: tuple[str, ...] = ("1x16", "1x128", "8x128", "1x16-256")  # on vs off
    bound_clients: int = 16  # the bound and the req/s targets are taken here
    batching_clients: tuple[int, ...] = (16, 32)

    @property
    def shapes(self) -> tuple[str, ...]:
        every = (*self.floor_shapes, *self.server_shapes, *self.batching_shapes)
        return tuple(dict.fromkeys(every))


@dataclass(frozen=True)
class Preset:
    name: str
    workloads: tuple[str, ...]
    concurrency: tuple[int, ...]
    configs: tuple[str, ...] = ("on", "off", "floor", "inprocess")
    merges: tuple[int, ...] = ()  # in-process best-batch sweep (the batching bound)
    timing: Timing = field(default_factory=Timing)
    rates: tuple[float, ...] = ()  # open-loop points (served configurations only)
    goals: Goals | None = None  # the PASS/MISS targets and the bound table


WITH_ECHO = ("on", "off", "floor", "echo", "inprocess")
LATENCY = Preset("latency", ("1x16", "1x128", "8x128"), (1, 4, 16), configs=WITH_ECHO)
BATCHING = Preset("batching", ("1x16", "1x128", "1x16-256"), (32,), merges=(1, 4, 8, 16, 32))
# Every contender side by side where the targets are taken: 60 points of 3.5 s.
TARGETS = Preset("targets", Goals().shapes, (1, 16, 32), configs=WITH_ECHO, goals=Goals())
FRONTEND_CONFIGS = ("frontends-1", "frontends-2", "frontends-default", "echo", "echo-2",
                    "inprocess")  # fmt: skip
FRONTENDS = Preset("frontends", ("1x16", "8x128", "1x16-256"), (16,), configs=FRONTEND_CONFIGS,
                   timing=Timing(duration_s=4.0, warmup_s=1.0))  # fmt: skip
QUICK_TIMING = Timing(duration_s=0.2, warmup_s=0.05, sweep_duration_s=0.15)
QUICK_GOALS = Goals(
    floor_shapes=("1x16",),
    server_shapes=("1x16",),
    batching_shapes=("1x16", "1x8-32"),
    bound_clients=4,
    batching_clients=(4,),
)
QUICK = (  # every configuration and code path, in seconds (the smoke test)
    Preset("latency", ("1x16",), (1, 4), configs=WITH_ECHO, timing=QUICK_TIMING),
    Preset("batching", ("1x8-32",), (4,), merges=(1, 4), timing=QUICK_TIMING),
    Preset("targets", QUICK_GOALS.shapes, (1, 4), configs=WITH_ECHO, timing=QUICK_TIMING,
           goals=QUICK_GOALS),
)  # fmt: skip
PRESETS = {
    "frontends": (FRONTENDS,),  # one process vs frontends before an engine (scenarios.frontends)
    "latency": (LATENCY,),
    "batching": (BATCHING,),
    "targets": (TARGETS,),
    "full": (LATENCY, BATCHING, TARGETS),  # the default: about 5.5 minutes
    "quick": QUICK,
}


def _points(preset: Preset, config: str, workload: Workload) -> list[Point]:
    if config == "inprocess":  # closed loop only: the best-batch sweep, else the clients
        if preset.merges:
            return [Point(config, workload, 1, merge=m) for m in preset.merges]
        return [Point(config, workload, c) for c in preset.concurrency]
    if config not in preset.configs and config != "external":
        return []
    return [Point(config, workload, c) for c in preset.concurrency] + [
        Point(config, workload, 1, rate=r) for r in preset.rates
    ]


def plan(presets: tuple[Preset, ...], configs: tuple[str, ...]) -> list[tuple[Point, Timing]]:
    """Every point of the presets for the configurations asked, grouped by configuration."""
    unique: dict[Point, Timing] = {}
    for config in configs:
        for preset in presets:
            for text in preset.workloads:
                for point in _points(preset, config, Workload.parse(text)):
                    unique.setdefault(point, preset.timing)  # shared points run once
    return list(unique.items())


@dataclass
class Pool:
    """Distinct requests of one workload: arrays (in-process) and serialized bytes (wire)."""

    arrays: list[dict[str, np.ndarray]]
    wire: list[bytes]


def build_pool(
    metadata: pb.ModelMetadataResponse, model: str, version: str, workload: Workload, seed: int
) -> Pool:
    """Seeded random requests: 8 of a fixed shape, or 64 with lengths drawn from the range."""
    rng = np.random.default_rng(seed)
    size = 64 if workload.is_mix else 8
    lengths = rng.integers(workload.low, workload.high + 1, size)
    arrays = [
        random_inputs(metadata, Sizes(workload.batch, int(length)), seed + i)
        for i, length in enumerate(lengths)
    ]
    wire = [
        codec.infer_request(model, a, version=version, request_id="").SerializeToString()
        for a in arrays
    ]
    return Pool(arrays, wire)
