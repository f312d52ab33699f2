"""The data plane: infer(request) -> response, with no transport in it.

It owns what every inference goes through whatever carried it: model lookup, validation,
the deadline, the model's scheduler, statistics, metrics and the access log. The gRPC
servicer (mha.service.grpc.servicer) only decodes a message, calls it and encodes the
answer; tests and in-process callers call it directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor

import numpy as np
import onnxruntime as ort

from mha import contract
from mha.service.core import (
    decoding,
    devices,
    repository,
    sequence_requests,
    sequences,
    validation,
)
from mha.service.core.errors import InvalidArgument, ServiceError, Unavailable
from mha.service.core.inference import InferRequest, InferResponse
from mha.service.core.models import Loader, ModelTable, ServedModel
from mha.service.core.repository import ModelSpec
from mha.service.core.scheduling import InferenceJob, JobResult, Runner
from mha.service.core.settings import Settings
from mha.service.core.stats import StatsMetrics, VersionStats

log = logging.getLogger(__name__)


def _outcome(err: BaseException) -> str:
    # A BaseException that is not an Exception is the task's cancellation (client gone).
    if not isinstance(err, Exception):
        return "cancelled"
    return err.reason if isinstance(err, ServiceError) else "internal"


class DataPlane:
    """Every model version of one server, and the inference path through them.

    After `refuse_new()` (the server is stopping) infer answers UNAVAILABLE at once while
    the requests already in it (`active`) finish.
    """

    def __init__(
        self,
        table: ModelTable,
        metrics: StatsMetrics,
        loader: Loader,
        store: sequences.SequenceStore,
        prefill_chunk_tokens: int = 0,
    ) -> None:
        self.table = table
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: a request's new rows in one run
        self.metrics = metrics
        self.loader = loader
        self.sequences = store
        self.active = 0  # infer calls in progress (event loop only, no lock needed)
        self.last_call = 0.0  # time.monotonic() of the latest infer call
        self.refusing = False

    @classmethod
    def create(
        cls,
        settings: Settings,
        executor: Executor,
        metrics: StatsMetrics,
        *,
        wrap_runner: Callable[[Runner], Runner] | None = None,
        before_load: Callable[[ModelSpec], None] | None = None,
    ) -> DataPlane:
        """The data plane of settings.repository (scanned now; load_all() loads it).

        Session runs go to `executor`; wrap_runner and before_load: see models.Loader.
        """
        loader = Loader(
            settings=settings,
            device_plan=devices.plan(settings.device, ort.get_available_providers()),
            threads=settings.threads or devices.default_threads(),
            executor=executor,
            metrics=metrics,
            wrap_runner=wrap_runner,
            before_load=before_load,
        )
        limits = sequences.SequenceLimits(
            cache_bytes=settings.kv_cache_bytes or sequences.machine_cache_bytes(),
            max_sequences=settings.max_sequences,
            idle_seconds=settings.sequence_idle_seconds,
            block_tokens=settings.kv_block_tokens,
        )
        store = sequences.SequenceStore(limits, metrics)
        table = ModelTable(repository.scan(settings.repository))
        return cls(table, metrics, loader, store, settings.prefill_chunk_tokens)

    @property
    def ready(self) -> bool:
        """Every model version on disk is loaded and warmed up."""
        return self.table.all_ready

    def refuse_new(self) -> None:
        self.refusing = True

    def session_closed(self, session: Hashable) -> int:
        """A stream ended: end the sequences it started; return how many."""
        return self.sequences.release_owner(session)

    async def load_all(self) -> int:
        """Load and warm up every model version off the event loop; return how many."""
        loop = asyncio.get_running_loop()
        for spec in self.table.all_specs():
            served = await loop.run_in_executor(self.loader.executor, self.loader.load, spec)
            self.table.served[spec.name, spec.version] = served
            loaded = served.loaded
            labels = (spec.name, str(spec.version))
            self.metrics.model_loaded(*labels, loaded.provider, spec.target, spec.dtype)
        return len(self.table.served)

    async def close(self) -> None:
        """Finish what the schedulers accepted, then mark every version not ready."""
        for (name, version), served in list(self.table.served.items()):
            await served.scheduler.close()
            self.metrics.model_unready(name, str(version))

    def model(self, name: str, version: str = "") -> ModelSpec:
        """The spec of name/version (latest when version is empty); NotFound otherwise."""
        return self.table.resolve(name, version)

    def versions(self, name: str) -> list[int]:
        return self.table.versions(name)

    def model_ready(self, name: str, version: str = "") -> bool:
        spec = self.table.resolve(name, version)
        return (spec.name, spec.version) in self.table.served

    def providers(self) -> list[str]:
        return self.table.providers()

    def statistics(self, name: str = "", version: str = "") -> list[tuple[ModelSpec, VersionStats]]:
        """Per model version asked for (all of a model without a version; all without a name)."""
        if name:
            spec = self.table.resolve(name, version)
            specs = [spec] if version else list(self.table.specs[spec.name].values())
        else:
            specs = self.table.all_specs()
        figures = self.metrics.statistics
        return [(s, figures.snapshot(s.name, str(s.version))) for s in specs]

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, schedule and answer one request; a ServiceError says what was wrong."""
        labels = ("", "")  # unknown model names stay out of the metric labels
        self.active += 1
        self.last_call = request.received
        try:
            if self.refusing:
                raise Unavailable("the server is shutting down; send the request again")
            served = self.table.get(request.model_name, request.model_version)
            labels = (served.spec.name, str(served.spec.version))
            return await self._infer(served, request, labels)
        except BaseException as err:
            self._failed(labels, err, request.received)
            raise
        finally:
            self.active -= 1

    async def _infer(
        self, served: ServedModel, request: InferRequest, labels: tuple[str, str]
    ) -> InferResponse:
        spec = served.spec
        control = sequence_requests.sequence_control(request.parameters, spec.name)
        if spec.sequence is not None:
            return await self._step(served, request, labels, control)
        if control is not None:
            raise InvalidArgument(
                f"model {spec.name!r} is not a sequence model, so it takes no sequence_id "
                f"(a model exported with --kv-cache decodes sequences)"
            )
        checked = validation.check(request, spec, served.limits)
        with served.admission.admit(request.id, checked.elements, request.deadline):
            decoded = checked.decode()
            job = InferenceJob(request.id, decoded.inputs, decoded.outputs, request.deadline)
            result = await self._run(served, job, request, labels)
        return self._response(served, request, labels, result, result.outputs)

    async def _step(
        self,
        served: ServedModel,
        request: InferRequest,
        labels: tuple[str, str],
        control: sequence_requests.SequenceControl | None,
    ) -> InferResponse:
        """One step of a sequence: its cache in, the step run (batched with others), rows out."""
        spec = served.spec
        assert spec.sequence is not None
        if control is None:
            raise InvalidArgument(
                f"model {spec.name!r} is a sequence model: every request needs a sequence_id "
                f"parameter (int64 or string), and the first one sequence_start"
            )
        key = (spec.name, spec.version, control.sequence_id)
        sequence_requests.check_one_sequence(request, key)
        if spec.sequence.is_memory:
            return await self._memory_step(served, request, labels, control, key)
        checked = validation.check(request, spec, served.limits)
        # Its work: the step's feeds, the past it reads too (a step costs by its context).
        work = checked.elements + 2 * self.sequences.length_of(key) * spec.d_model
        with served.admission.admit(request.id, work, request.deadline):
            query = checked.decode().inputs[contract.QUERY]
            entry = await self._enter(served, request, control, key)
            result = await self._step_run(served, request, labels, control, entry, query)
        return self._step_response(served, request, labels, result)

    async def _step_run(
        self,
        served: ServedModel,
        request: InferRequest,
        labels: tuple[str, str],
        control: sequence_requests.SequenceControl,
        entry: sequences.Sequence,
        query: np.ndarray,
    ) -> JobResult:
        """The new rows' step, in chunks of --prefill-chunk-tokens rows (each its own run,
        so other sequences' steps run between them); a failure keeps the rows it had."""
        failed, before = True, entry.length
        try:
            self.sequences.make_room(entry, query.shape[1])
            results = []
            for chunk in decoding.chunks(query, self.prefill_chunk_tokens):
                inputs = decoding.step_inputs(chunk, *entry.past())
                job = InferenceJob(
                    request.id, inputs, decoding.STEP_OUTPUTS, request.deadline,
                    offload=chunk.shape[1] > 1,
                )  # fmt: skip
                result = await self._submit(served, job, labels)
                new = result.outputs
                self.sequences.append(entry, new[contract.NEW_KEY][0], new[contract.NEW_VALUE][0])
                results.append(result)
            failed = False
        finally:
            if failed:
                self.sequences.truncate(entry, before)
            # A failed first request leaves no empty sequence behind.
            self.sequences.leave(entry, end=control.end or (failed and control.start))
        result = decoding.joined(results)
        self._record(request, labels, result, query)
        return result

    async def _memory_step(
        self,
        served: ServedModel,
        request: InferRequest,
        labels: tuple[str, str],
        control: sequence_requests.SequenceControl,
        key: sequences.SequenceKey,
    ) -> InferResponse:
        """A step over a held memory: the start request brings the memory, later ones not."""
        spec = served.spec
        view = sequence_requests.memory_request_spec(spec, request, control, key)
        checked = validation.check(request, view, served.limits)
        with served.admission.admit(request.id, checked.elements, request.deadline):
            decoded = checked.decode()
            entry = await self._enter(served, request, control, key)
            result = await self._memory_run(served, request, labels, control, entry, decoded)
        return self._step_response(served, request, labels, result)

    async def _memory_run(
        self,
        served: ServedModel,
        request: InferRequest,
        labels: tuple[str, str],
        control: sequence_requests.SequenceControl,
        entry: sequences.Sequence,
        decoded: validation.Decoded,
    ) -> JobResult:
        failed = True
        try:
            if control.start:
                await self._hold_memory(served, entry, decoded.inputs)
            assert entry.mask is not None
            inputs = decoding.memory_step_inputs(
                decoded.inputs[contract.QUERY], *entry.past(), entry.mask[None]
            )
            job = InferenceJob(request.id, inputs, decoding.MEMORY_OUTPUTS, request.deadline)
            result = await self._run(served, job, request, labels)
            failed = False
        finally:
            self.sequences.leave(entry, end=control.end or (failed and control.start))
        return result

    async def _enter(
        self,
        served: ServedModel,
        request: InferRequest,
        control: sequence_requests.SequenceControl,
        key: sequences.SequenceKey,
    ) -> sequences.Sequence:
        """The sequence, its turn taken; its cache layout from the model."""
        spec = served.spec
        assert spec.sequence is not None
        # --max-sequence-length caps a sequence's context as well as a request's tokens.
        context = min(spec.sequence.max_context, served.limits.max_sequence_length)
        layout = sequences.CacheLayout(spec.d_model, contract.DTYPES[spec.dtype], context)
        return await self.sequences.enter(key, layout, start=control.start, owner=request.session)

    async def _hold_memory(
        self, served: ServedModel, entry: sequences.Sequence, inputs: dict[str, np.ndarray]
    ) -> None:
        """Project the start request's memory once (memory.onnx) and keep it, with its mask."""
        runner = served.loaded.memory_runner
        assert runner is not None
        self.sequences.make_room(entry, inputs[contract.KEY].shape[1])
        feeds = {contract.KEY: inputs[contract.KEY], contract.VALUE: inputs[contract.VALUE]}
        names = (contract.MEMORY_KEY, contract.MEMORY_VALUE)
        loop = asyncio.get_running_loop()
        projected = await loop.run_in_executor(self.loader.executor, runner, feeds, names)
        memory_key, memory_value = projected[contract.MEMORY_KEY], projected[contract.MEMORY_VALUE]
        self.sequences.append(entry, memory_key[0], memory_value[0])
        entry.mask = np.array(inputs[contract.KEY_PADDING_MASK][0], dtype=bool)

    def _step_response(
        self, served: ServedModel, request: InferRequest, labels: tuple[str, str], result: JobResult
    ) -> InferResponse:
        self.metrics.child(self.metrics.step_seconds, *labels).observe(
            time.monotonic() - request.received
        )
        outputs = {contract.OUTPUT: result.outputs[contract.OUTPUT]}
        return self._response(served, request, labels, result, outputs)

    async def _run(
        self, served: ServedModel, job: InferenceJob, request: InferRequest, labels: tuple[str, str]
    ) -> JobResult:
        """Submit to the model's scheduler and record the request's success."""
        result = await self._submit(served, job, labels)
        self._record(request, labels, result, job.inputs[contract.QUERY])
        return result

    async def _submit(
        self, served: ServedModel, job: InferenceJob, labels: tuple[str, str]
    ) -> JobResult:
        """Submit to the model's scheduler, counted in flight meanwhile."""
        self.metrics.child(self.metrics.inflight, *labels).inc()
        try:
            return await served.scheduler.submit(job)
        finally:
            self.metrics.child(self.metrics.inflight, *labels).dec()

    def _record(
        self, request: InferRequest, labels: tuple[str, str], result: JobResult, query: np.ndarray
    ) -> None:
        elapsed = time.monotonic() - request.received
        self._succeeded(labels, elapsed, result.queue_ns, result.compute_ns, query.shape[0])
        if log.isEnabledFor(logging.DEBUG):  # an access log line, off at the default INFO
            log.debug(
                "ModelInfer %s/%s query %s: %.2f ms (queue %.2f, compute %.2f, run of %d)",
                *labels, list(query.shape), elapsed * 1e3,
                result.queue_ns / 1e6, result.compute_ns / 1e6, result.batch_size,
            )  # fmt: skip

    def _response(
        self,
        served: ServedModel,
        request: InferRequest,
        labels: tuple[str, str],
        result: JobResult,
        outputs: dict[str, np.ndarray],
    ) -> InferResponse:
        return InferResponse(
            model_name=labels[0],
            model_version=labels[1],
            id=request.id,
            outputs=outputs,
            parameters={"provider": served.loaded.provider},
            queue_ns=result.queue_ns,
            compute_ns=result.compute_ns,
            batch_size=result.batch_size,
        )

    def _succeeded(
        self, labels: tuple[str, str], elapsed: float, queue_ns: int, compute_ns: int, samples: int
    ) -> None:
        self.metrics.request_done(*labels, "success", elapsed)
        self.metrics.queued(*labels, queue_ns / 1e9)
        self.metrics.statistics.success(*labels, int(elapsed * 1e9), queue_ns, compute_ns, samples)

    def _failed(self, labels: tuple[str, str], err: BaseException, started: float) -> None:
        elapsed = time.monotonic() - started
        self.metrics.request_done(*labels, _outcome(err), elapsed)
        if labels[0]:
            self.metrics.statistics.failure(*labels, int(elapsed * 1e9))
