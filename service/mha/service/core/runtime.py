"""ONNX Runtime sessions: create one per model version, warm it up, run it.

A runner (mha.service.core.scheduling.Runner) is the only thing schedulers see: feeds by
input name -> outputs by name. It blocks, so schedulers call it from a thread pool; one
InferenceSession allows concurrent run() calls, so a runner is thread-safe as is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mha import contract
from mha.service.core import devices
from mha.service.core.errors import StartupError
from mha.service.core.repository import ModelSpec, TensorSpec
from mha.service.core.scheduling import Runner

log = logging.getLogger(__name__)

# 3 = errors only. ORT warns on every run of an attention-weights export (a harmless
# VerifyOutputSizes mismatch on the weights output), which would flood the log.
ORT_LOG_SEVERITY = 3
WARMUP_LENGTH = 8


@dataclass
class LoadedModel:
    """A model version whose session is created and warmed up."""

    spec: ModelSpec
    provider: str  # execution provider in use, e.g. CPUExecutionProvider
    runner: Runner
    load_seconds: float
    memory_runner: Runner | None = None  # a memory model's projection (memory.onnx)


def session_options(
    threads: int, spinning: bool = False, arena: bool = False
) -> ort.SessionOptions:
    """The server's session options; spinning=True keeps ORT's default busy-wait.

    arena=True keeps ORT's CPU memory arena (sequence models: see create_session).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One graph, one attention node: there is nothing to run in parallel between ops.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = ORT_LOG_SEVERITY
    # Stateless models: shapes vary per request (and per merged batch), and the CPU arena
    # keeps its peak forever (measured: 370 MB RSS after 300 runs of B<=32, L<=256,
    # d_model 512; 145 MB without it) while dropping it cost no measurable latency at
    # (1,16), (1,128) or (8,128). Sequence models keep it: a step's buffers (the graph
    # concatenates past and new keys, ~4 MB a sequence at P = 1024) fresh from the system
    # cost a page fault per 4 KiB, and the arena took 32 sequences at P = 1024 from 228 to
    # 703 tokens/s batched and 793 to 1341 unbatched (mha bench decode); its peak is
    # bounded by the steps' contexts, which --kv-cache-bytes bounds.
    options.enable_cpu_mem_arena = arena
    if not spinning:
        # ORT's idle intra-op threads spin on the cores the event loop, the gRPC threads and
        # the batcher need. Measured here (2 cores, default model, 16 clients): +31% req/s
        # at (1,16), +10-25% at (1,128); p50 at one client within noise.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class SessionRunner:
    """session.run on CPU; IO binding on CUDA (inputs copied once, outputs allocated on GPU).

    `bind` names the device outputs are bound to ("cuda" on the CUDA provider, None = no
    IO binding); "cpu" runs the same IO binding code on a CPU session.
    """

    def __init__(
        self, session: ort.InferenceSession, provider: str, *, bind: str | None = None
    ) -> None:
        self.session = session
        self.bind = bind if bind is not None else ("cuda" if provider == devices.CUDA else None)

    @property
    def io_binding(self) -> bool:
        return self.bind is not None

    def __call__(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        if self.io_binding:
            return self._run_bound(feeds, outputs)
        values = self.session.run(list(outputs), dict(feeds))
        return dict(zip(outputs, values, strict=True))

    def _run_bound(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        # One binding per call: an IOBinding is not safe to share between threads.
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in outputs:
            # Shapes are dynamic, so ORT allocates each output on the device at run time.
            binding.bind_output(name, self.bind, devices.CUDA_OPTIONS["device_id"])
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.copy_outputs_to_cpu()
        return dict(zip(outputs, values, strict=True))


class ZeroRunner:
    """The --no-compute floor: zeros of the right shapes and dtypes, no ONNX Runtime."""

    inline = True  # cheaper than a thread hop: schedulers call it on the event loop

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.dtype = contract.DTYPES[spec.dtype]
        # Each output's axes worked out once (they cost ~5 us a tensor a call otherwise).
        self.axes = {name: spec.axes_of(name) for name in spec.graph_output_names}

    def __call__(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        B, L, _ = feeds[contract.QUERY].shape  # paper names
        S = feeds[contract.KEY_PADDING_MASK].shape[1]
        sizes = {"B": B, "L": L, "S": S, "T": L, "C": S, "P": S - L}
        return {
            name: np.zeros(tuple(sizes[d] if isinstance(d, str) else d for d in self.axes[name]),
                           self.dtype)
            for name in outputs
        }  # fmt: skip


def warmup_feeds(
    spec: ModelSpec, tensors: Sequence[TensorSpec] | None = None, length: int = WARMUP_LENGTH
) -> dict[str, np.ndarray]:
    """Small random inputs for every graph input (B=1, L=S=length; a step: P=T=length)."""
    rng = np.random.default_rng(0)
    sizes = {"B": 1, "L": length, "S": length, "T": length, "P": length, "C": 2 * length}
    feeds: dict[str, np.ndarray] = {}
    for tensor in spec.graph_inputs if tensors is None else tensors:
        shape = spec.shape_of(tensor.name, sizes)
        if tensor.datatype == "BOOL":
            feeds[tensor.name] = np.zeros(shape, dtype=bool)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(contract.DTYPES[tensor.datatype])
    return feeds


def create_session(
    spec: ModelSpec, device_plan: devices.DevicePlan, threads: int, path: Path | None = None
) -> tuple[ort.InferenceSession, str]:
    """A session for one model version (or its memory.onnx) and the provider it really uses."""
    path = spec.model_file if path is None else path
    try:
        session = ort.InferenceSession(
            str(path),
            sess_options=session_options(threads, arena=spec.sequence is not None),
            providers=list(device_plan.providers),
            provider_options=list(device_plan.options),
        )
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
        raise StartupError(f"{path}: ONNX Runtime cannot load it: {err}") from err
    label = f"{spec.name}/{spec.version}"
    provider = devices.check_session_providers(device_plan, session.get_providers(), label)
    return session, provider


def load(
    spec: ModelSpec, device_plan: devices.DevicePlan, threads: int, no_compute: bool = False
) -> LoadedModel:
    """Create the session and run a warm-up so the first request pays no lazy set-up."""
    start = time.monotonic()
    session, provider = create_session(spec, device_plan, threads)
    runner: Runner = ZeroRunner(spec) if no_compute else SessionRunner(session, provider)
    feeds = warmup_feeds(spec)
    SessionRunner(session, provider)(feeds, spec.graph_output_names)
    memory_runner = load_memory(spec, device_plan, threads)
    seconds = time.monotonic() - start
    log.info(
        "model %s version %d loaded on %s (%d threads, target %s, %s) in %.2f s%s",
        spec.name, spec.version, provider, threads, spec.target, spec.dtype, seconds,
        " [no-compute: answers are zeros]" if no_compute else "",
    )  # fmt: skip
    return LoadedModel(spec, provider, runner, seconds, memory_runner)


def load_memory(spec: ModelSpec, device_plan: devices.DevicePlan, threads: int) -> Runner | None:
    """A memory model's projection graph, warmed up (None for every other model)."""
    sequence = spec.sequence
    if sequence is None or not sequence.is_memory or sequence.memory_file is None:
        return None
    session, provider = create_session(spec, device_plan, threads, spec.path / sequence.memory_file)
    runner = SessionRunner(session, provider)
    runner(warmup_feeds(spec, sequence.memory_inputs), [t.name for t in sequence.memory_outputs])
    return runner
