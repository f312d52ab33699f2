"""The model versions a server holds: every one on disk, and how each is loaded and scheduled.

ModelTable answers NOT_FOUND vs "not ready yet" from the repository scan before any session
exists. load_model turns one ModelSpec into a ServedModel: an ONNX Runtime session (warmed
up), its request limits and its scheduler (batching or direct, per the settings).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from mha.service.core import runtime
from mha.service.core.admission import Admission
from mha.service.core.batching import BatchingOptions, BatchingScheduler
from mha.service.core.decoding import MemoryRuns, StepRuns
from mha.service.core.devices import CUDA, DevicePlan
from mha.service.core.errors import NotFound, StartupError, Unavailable
from mha.service.core.metrics import Metrics
from mha.service.core.repository import ModelSpec
from mha.service.core.runtime import LoadedModel
from mha.service.core.scheduling import DirectScheduler, PromptsApart, Runner, Scheduler
from mha.service.core.settings import Settings
from mha.service.core.validation import Limits

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model version with its scheduler and request limits."""

    loaded: LoadedModel
    scheduler: Scheduler
    limits: Limits
    admission: Admission = field(default_factory=lambda: Admission(0.0))

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec


class ModelTable:
    """Every model version on disk, and the ones loaded so far (the servicer's lookup)."""

    def __init__(self, specs: dict[str, dict[int, ModelSpec]]) -> None:
        self.specs = specs
        self.served: dict[tuple[str, int], ServedModel] = {}

    def resolve(self, name: str, version: str = "") -> ModelSpec:
        """The spec of name/version (latest when version is empty); NotFound otherwise."""
        versions = self.specs.get(name)
        if versions is None:
            raise NotFound(
                f"model {name!r} not found; this server has: {', '.join(sorted(self.specs))}"
            )
        if not version:
            return versions[max(versions)]
        # ASCII digits only: "¹" or "①" pass isdigit() but int() refuses them, and "１" or
        # "١" would otherwise name version 1.
        if not (version.isascii() and version.isdigit()) or int(version) not in versions:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: "
                f"{', '.join(str(v) for v in sorted(versions))}"
            )
        return versions[int(version)]

    def versions(self, name: str) -> list[int]:
        """The versions of a model in the repository, in order; NotFound if unknown."""
        return sorted(self.specs[self.resolve(name).name])

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model version; NotFound if unknown, Unavailable if not loaded yet."""
        spec = self.resolve(name, version)
        served = self.served.get((spec.name, spec.version))
        if served is None:
            raise Unavailable(f"model {name!r} version {spec.version} is not ready (loading)")
        return served

    def all_specs(self) -> list[ModelSpec]:
        return [spec for versions in self.specs.values() for spec in versions.values()]

    @property
    def all_ready(self) -> bool:
        return len(self.served) == len(self.all_specs())

    def providers(self) -> list[str]:
        return sorted({s.loaded.provider for s in self.served.values()})


def padding_for(provider: str) -> float:
    """Default padded-token cap of merged runs on this execution provider.

    On CPU a run's cost per sample barely falls with the batch size, so padding is pure
    loss: measured on 2 cores, 32 clients, L uniform in [16, 256], batching reached 0.66x the
    throughput of no batching at a 0.25 cap and 0.82x at 0 (equal lengths merge, which still
    pays at fixed shapes: 1.12x at (1,16)). A GPU is left idle by small runs, so padding is
    cheap there and ragged merging pays (not measured here: no GPU).
    """
    return 0.25 if provider == CUDA else 0.0


def inline_for(provider: str) -> float:
    """Default longest expected run (us) that runs on the event loop (core.scheduling.RunPlace).

    On CPU, measured on 2 cores with --no-batching, runs on the loop instead of the executor
    gave 1.15-1.25x the req/s at (1,128) (1 and 16 clients) and a lower p99 at (1,16), and
    kept resident memory at ~190 MB instead of ~550 MB (one malloc arena, not one per
    executor thread). 20 ms keeps the loop answering probes meanwhile. On a GPU the
    executor stays: the host merges and copies the next batch while the device computes.
    """
    return 0.0 if provider == CUDA else 20_000.0


def limits_for(spec: ModelSpec, settings: Settings) -> Limits:
    """Per-request limits: the settings' when given, else the model's mha.json."""
    return Limits(
        max_batch_size=settings.max_batch_size or spec.max_batch_size,
        max_sequence_length=settings.max_sequence_length or spec.max_sequence_length,
        max_bytes=settings.max_message_bytes,
    )


def batching_options(settings: Settings, limits: Limits, provider: str) -> BatchingOptions:
    """The batcher's options from the settings; StartupError naming a bad one."""
    padding = settings.max_padding_fraction
    try:
        return BatchingOptions(
            # The batcher's own default (32) capped by the server's per-request limit.
            max_batch_size=min(BatchingOptions().max_batch_size, limits.max_batch_size),
            max_queue_delay_us=settings.max_batch_delay_us,
            max_queue_size=settings.max_queue_size,
            policy=settings.batch_policy,
            max_padding_fraction=padding_for(provider) if padding is None else padding,
            max_in_flight=settings.max_batches_in_flight,
        )
    except ValueError as err:
        raise StartupError(f"batching settings: {err}") from err


@dataclass(frozen=True)
class Loader:
    """What loading a model version needs: settings, device plan, threads, pool, metrics.

    wrap_runner puts a runner in front of ONNX Runtime's (tests use it to hold a run);
    before_load is called in the loading thread before each version loads (tests use it to
    hold the loading).
    """

    settings: Settings
    device_plan: DevicePlan
    threads: int
    executor: Executor
    metrics: Metrics
    wrap_runner: Callable[[Runner], Runner] | None = None
    before_load: Callable[[ModelSpec], None] | None = None

    def load(self, spec: ModelSpec) -> ServedModel:
        """Create and warm up the session (blocking: call it off the event loop)."""
        if self.before_load is not None:
            self.before_load(spec)
        loaded = runtime.load(spec, self.device_plan, self.threads, self.settings.no_compute)
        runner = self.wrap_runner(loaded.runner) if self.wrap_runner else loaded.runner
        limits = limits_for(spec, self.settings)
        scheduler = self.scheduler(spec, runner, limits, loaded.provider)
        admission = Admission(self.settings.max_queue_delay_ms / 1000)
        return ServedModel(loaded, scheduler, limits, admission)

    def scheduler(
        self, spec: ModelSpec, runner: Runner, limits: Limits, provider: str
    ) -> Scheduler:
        labels = (spec.name, str(spec.version))
        given = self.settings.inline_runs_under_us
        inline = (inline_for(provider) if given is None else given) / 1e6
        if not self.settings.batching:
            return DirectScheduler(
                runner, self.executor, metrics=self.metrics, labels=labels, inline_under_s=inline
            )
        options = batching_options(self.settings, limits, provider)
        if spec.sequence is not None:
            # Continuous batching: every queued step (one per sequence) joins the next run,
            # whatever its context length (decoding.StepRuns pads and masks them).
            # A prompt's chunks run apart (scheduling.PromptsApart), never holding the steps.
            options = dataclasses.replace(options, policy="fifo")
            steps = BatchingScheduler(
                runner, options, self_attention=True, metrics=self.metrics, labels=labels,
                executor=self.executor, inline_under_s=inline,
                runs=MemoryRuns() if spec.sequence.is_memory else StepRuns(),
            )  # fmt: skip
            prompts = DirectScheduler(runner, self.executor, metrics=self.metrics, labels=labels)
            return PromptsApart(steps, prompts)
        return BatchingScheduler(
            runner, options, self_attention=spec.self_attention, metrics=self.metrics,
            labels=labels, executor=self.executor, inline_under_s=inline,
        )  # fmt: skip
