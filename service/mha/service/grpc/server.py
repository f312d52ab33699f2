"""The server: wiring (servicer, health, reflection, metrics), model loading, lifecycle.

Lifecycle: bind and start at once (liveness SERVING, readiness NOT_SERVING), load and warm
up every model version off the event loop, then readiness SERVING. On SIGTERM/SIGINT:
readiness NOT_SERVING at once, keep serving for drain_seconds (load balancers notice),
then stop accepting (new calls get UNAVAILABLE) and give in-flight calls grace_seconds.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core import devices, runtime
from mha.service.core import repository as model_repository
from mha.service.core.errors import StartupError
from mha.service.core.scheduling import DirectScheduler, Runner, Scheduler
from mha.service.core.settings import Settings
from mha.service.core.stats import Statistics, StatsMetrics
from mha.service.core.validation import Limits
from mha.service.grpc.servicer import InferenceServicer

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
LIVENESS = "liveness"
READINESS_NAMES = ("", INFERENCE_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# On stop, answer UNAVAILABLE until calls pause this long (see Server.stop), at most ...
QUIET_SECONDS = 0.1
QUIET_LIMIT_SECONDS = 1.0


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the server: message limits, connection age."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Two servers must never share a port by accident (tests bind port 0 in parallel).
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_seconds > 0:
        age_ms = int(settings.max_connection_age_seconds * 1000)
        options.append(("grpc.max_connection_age_ms", age_ms))
    if settings.max_connection_age_grace_seconds > 0:
        grace_ms = int(settings.max_connection_age_grace_seconds * 1000)
        options.append(("grpc.max_connection_age_grace_ms", grace_ms))
    return options


def write_port_file(path: Path, port: int) -> None:
    """Write the port atomically, so a reader polling for the file never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


class Server:
    """One serving process's parts. `wrap_runner` lets tests put a runner in front of ORT."""

    def __init__(
        self, settings: Settings, *, wrap_runner: Callable[[Runner], Runner] | None = None
    ) -> None:
        self.settings = settings
        self.device_plan = devices.plan(settings.device, ort.get_available_providers())
        self.threads = settings.threads or devices.default_threads()
        self.table = runtime.ModelTable(model_repository.scan(settings.repository))
        self.metrics = StatsMetrics(Statistics())
        # health.aio is imported lazily inside grpc_health, so mypy does not see it.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="mha-run")
        self.wrap_runner = wrap_runner
        self.servicer = InferenceServicer(self.table, self.metrics, self.is_ready)
        self.draining = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None

    def is_ready(self) -> bool:
        return self.table.all_ready and not self.draining

    async def start(self) -> int:
        """Bind, start serving (not ready yet) and the metrics endpoint; return the port."""
        server = grpc.aio.server(options=grpc_options(self.settings))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self.health.set(LIVENESS, SERVING)
        for name in READINESS_NAMES:
            await self.health.set(name, NOT_SERVING)
        if self.settings.reflection:
            names = (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
            reflection.enable_server_reflection(
                (*names, reflection.SERVICE_NAME), server, pool=reflection_pool()
            )
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot bind gRPC to {address}: {err}") from err
        await server.start()
        self._grpc = server
        log.info("gRPC listening on %s:%d", self.settings.host, self.port)
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        if self.settings.port_file is not None:
            write_port_file(self.settings.port_file, self.port)
        return self.port

    async def load_models(self) -> None:
        """Load and warm up every model version, then turn readiness SERVING."""
        loop = asyncio.get_running_loop()
        for spec in self.table.all_specs():
            loaded = await loop.run_in_executor(
                self.executor, runtime.load, spec, self.device_plan, self.threads,
                self.settings.no_compute,
            )  # fmt: skip
            runner = self.wrap_runner(loaded.runner) if self.wrap_runner else loaded.runner
            limits = Limits(
                max_batch_size=self.settings.max_batch_size or spec.max_batch_size,
                max_sequence_length=self.settings.max_sequence_length or spec.max_sequence_length,
                max_bytes=self.settings.max_message_bytes,
            )
            scheduler = self._scheduler(spec, runner, limits, loaded.provider)
            self.table.served[spec.name, spec.version] = runtime.ServedModel(
                loaded, scheduler, limits
            )
            labels = (spec.name, str(spec.version))
            self.metrics.model_loaded(*labels, loaded.provider, spec.target, spec.dtype)
        if not self.draining:
            for name in READINESS_NAMES:
                await self.health.set(name, SERVING)
            log.info("ready: %d model version(s) loaded", len(self.table.served))

    def _scheduler(
        self, spec: model_repository.ModelSpec, runner: Runner, limits: Limits, provider: str
    ) -> Scheduler:
        labels = (spec.name, str(spec.version))
        if self.settings.batching:
            try:
                batching = importlib.import_module("mha.service.core.batching")
            except ModuleNotFoundError as err:
                if err.name != "mha.service.core.batching":
                    raise
                log.warning(
                    "batching is on but mha.service.core.batching is missing; serving %s/%d "
                    "without batching", spec.name, spec.version,
                )  # fmt: skip
            else:
                return self._batching_scheduler(batching, spec, runner, limits, provider)
        return DirectScheduler(runner, self.executor, metrics=self.metrics, labels=labels)

    def _batching_scheduler(
        self,
        batching: Any,
        spec: model_repository.ModelSpec,
        runner: Runner,
        limits: Limits,
        provider: str,
    ) -> Scheduler:
        padding = self.settings.max_padding_fraction
        if padding is None:
            padding = padding_for(provider)
        try:
            options = batching.BatchingOptions(
                # The batcher's own default (32) capped by the server's per-request limit.
                max_batch_size=min(batching.BatchingOptions().max_batch_size,
                                   limits.max_batch_size),
                max_queue_delay_us=self.settings.max_batch_delay_us,
                max_queue_size=self.settings.max_queue_size,
                policy=self.settings.batch_policy,
                max_padding_fraction=padding,
                max_in_flight=self.settings.max_batches_in_flight,
            )  # fmt: skip
        except ValueError as err:
            raise StartupError(f"batching settings: {err}") from err
        return batching.BatchingScheduler(  # type: ignore[no-any-return]
            runner, options, self_attention=spec.self_attention, metrics=self.metrics,
            labels=(spec.name, str(spec.version)), executor=self.executor,
        )  # fmt: skip

    async def drain(self) -> None:
        """Readiness NOT_SERVING at once; keep serving for drain_seconds."""
        self.draining = True
        for name in READINESS_NAMES:
            await self.health.set(name, NOT_SERVING)
        log.info("draining: NOT_SERVING, still serving for %.1f s", self.settings.drain_seconds)
        await asyncio.sleep(self.settings.drain_seconds)

    async def stop(self) -> None:
        """Refuse new calls, let in-flight ones finish within grace_seconds, release all.

        New inference calls get UNAVAILABLE from the servicer while the accepted ones
        finish; then gRPC closes the port. gRPC's own stop() CANCELs calls that reached the
        transport but no handler yet, so before it the servicer keeps answering UNAVAILABLE
        until no call came for QUIET_SECONDS (at most QUIET_LIMIT_SECONDS, within grace).
        """
        self.draining = True
        self.servicer.refuse_new()
        if self._grpc is not None:
            grace = self.settings.grace_seconds
            log.info("stopping: %d in-flight requests get %.1f s", self.servicer.active, grace)
            end = time.monotonic() + grace
            quiet_until = min(end, time.monotonic() + QUIET_LIMIT_SECONDS)
            while time.monotonic() < end and (
                self.servicer.active
                or (time.monotonic() < quiet_until
                    and time.monotonic() - self.servicer.last_call < QUIET_SECONDS)
            ):  # fmt: skip
                await asyncio.sleep(0.005)
            await self._grpc.stop(max(0.0, end - time.monotonic()))
        for key, served in list(self.table.served.items()):
            await served.scheduler.close()
            self.metrics.model_unready(key[0], str(key[1]))
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.shutdown()
        log.info("stopped: %d requests answered, %d refused", *self.metrics.statistics.totals())


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and stop (the `mha serve` main loop)."""
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    loading = asyncio.create_task(server.load_models())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a load failure (StartupError) ends the process here
            await stopping
        else:
            loading.cancel()
        log.info("signal received")
        await server.drain()
    finally:
        stopping.cancel()
        await server.stop()


def padding_for(provider: str) -> float:
    """Default padded-token cap of merged runs on this execution provider.

    On CPU a run's cost per sample barely falls with the batch size, so padding is pure
    loss: measured on 2 cores, 32 clients, L uniform in [16, 256], batching reached 0.66x the
    throughput of no batching at a 0.25 cap and 0.82x at 0 (equal lengths merge, which still
    pays at fixed shapes: 1.12x at (1,16)). A GPU is left idle by small runs, so padding is
    cheap there and ragged merging pays (not measured here: no GPU).
    """
    return 0.25 if provider == "CUDAExecutionProvider" else 0.0


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors reflection serves: ours (kept out of the default pool), health, itself."""
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool
