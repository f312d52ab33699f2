"""The server: wiring (servicer, health, reflection, metrics), model loading, lifecycle.

Lifecycle: bind and start at once (liveness SERVING, readiness NOT_SERVING), load and warm
up every model version off the event loop, then readiness SERVING. On SIGTERM/SIGINT:
readiness NOT_SERVING at once, keep serving for drain_seconds (load balancers notice),
then stop accepting (new calls get UNAVAILABLE) and give in-flight calls grace_seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core import memory
from mha.service.core.dataplane import DataPlane
from mha.service.core.repository import ModelSpec
from mha.service.core.scheduling import Runner
from mha.service.core.settings import Settings
from mha.service.core.stats import Statistics, StatsMetrics
from mha.service.grpc import reflection, security
from mha.service.grpc.guard import HEALTH_SERVICE, Guard, Registrar
from mha.service.grpc.health import Health
from mha.service.grpc.plane import Plane
from mha.service.grpc.reflection import INFERENCE_SERVICE
from mha.service.grpc.servicer import CODECS, InferenceServicer

log = logging.getLogger(__name__)

# On stop, answer UNAVAILABLE until calls pause this long (see Server.stop), at most ...
QUIET_SECONDS = 0.1
QUIET_LIMIT_SECONDS = 1.0
PENDING_CALLS = 1 << 20  # gRPC core's backlog of calls not yet picked up (see grpc_options)


def grpc_options(settings: Settings, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Channel arguments of the server: message limits, connection age; reuse_port for the
    frontends of one server (mha.service.frontends), which share its port on purpose."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Two servers must never share a port by accident (tests bind port 0 in parallel).
        ("grpc.so_reuseport", int(reuse_port)),
        # Calls the asyncio server has not picked up yet wait in gRPC core, which CANCELs them
        # at random past 1,000 and all past 3,000 by default: answers nobody asked for and no
        # reason given. The server's own limits (--max-concurrent-rpcs, the queues) refuse
        # instead, saying why; so core's backlog limits are set out of their way.
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
    ]
    if settings.max_concurrent_streams > 0:
        options.append(("grpc.max_concurrent_streams", settings.max_concurrent_streams))
    if settings.max_connection_age_seconds > 0:
        age_ms = int(settings.max_connection_age_seconds * 1000)
        options.append(("grpc.max_connection_age_ms", age_ms))
    if settings.max_connection_age_grace_seconds > 0:
        grace_ms = int(settings.max_connection_age_grace_seconds * 1000)
        options.append(("grpc.max_connection_age_grace_ms", grace_ms))
    return options


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind one port, TLS when credentials are given, else plaintext; return the port."""
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot bind gRPC to {address}: {err}") from err


def write_port_file(path: Path, port: int) -> None:
    """Write the port atomically, so a reader polling for the file never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


class Server:
    """One serving process's parts; wrap_runner and before_load: see core.models.Loader.

    With `plane` given (a frontend's RemotePlane, mha.service.frontends) the server does the
    protocol work only: the plane's owner runs the sessions, the sweeper and the metrics;
    reuse_port lets the frontends share the port, `extensions` name the frontend.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        wrap_runner: Callable[[Runner], Runner] | None = None,
        before_load: Callable[[ModelSpec], None] | None = None,
        plane: Plane | None = None,
        reuse_port: bool = False,
        extensions: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.metrics = StatsMetrics(Statistics())
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="mha-run")
        self.local: DataPlane | None = None
        if plane is None:
            plane = self.local = DataPlane.create(
                settings, self.executor, self.metrics,
                wrap_runner=wrap_runner, before_load=before_load,
            )  # fmt: skip
        self.plane: Plane = plane
        self.health = Health()
        self.servicer = InferenceServicer(self.plane, self.is_ready, extensions)
        tokens = None
        if settings.auth_token_file is not None:
            tokens = security.TokenFile(settings.auth_token_file)
        self.guard = Guard(tokens, open_services=(HEALTH_SERVICE,))
        self.certificates: security.CertificateFiles | None = None
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None
        self._trimming: asyncio.Task[None] | None = None
        self.trimmer = memory.Trimmer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None

    def is_ready(self) -> bool:
        return self.plane.ready and not self.draining

    async def start(self) -> int:
        """Bind, start serving (not ready yet) and the metrics endpoint; return the port."""
        settings = self.settings
        credentials = None
        if settings.tls_cert_file is not None:
            credentials, self.certificates = security.server_credentials(settings)
        server = grpc.aio.server(
            options=grpc_options(settings, self.reuse_port),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        registrar = Registrar(
            server, self.guard, takes_undecodable=(f"/{INFERENCE_SERVICE}/ModelStreamInfer",),
            codecs=CODECS,
        )  # fmt: skip
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, registrar)
        await self.health.attach(registrar)
        if settings.reflection:
            reflection.enable(registrar)
        registrar.done()
        self.port = _bind(server, f"{settings.host}:{settings.port}", credentials)
        await server.start()
        self._grpc = server
        security_note = "plaintext" if credentials is None else "TLS"
        if settings.tls_client_ca_file is not None:
            security_note = "mTLS: client certificates required"
        if settings.auth_token_file is not None:
            security_note += "; bearer tokens required"
        log.info("gRPC listening on %s:%d (%s)", settings.host, self.port, security_note)
        if settings.auth_token_file is not None and credentials is None:
            log.warning(
                "bearer tokens over plaintext: anyone on the path can read them; use "
                "--tls-cert-file/--tls-key-file unless a mesh encrypts the connection"
            )
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(settings.host, settings.metrics_port)
            log.info("metrics on http://%s:%d/metrics", settings.host, self.metrics_port)
            if settings.metrics_port_file is not None:
                write_port_file(settings.metrics_port_file, self.metrics_port)
        if settings.health_port is not None:
            await self._start_health_port(settings)
        if settings.port_file is not None:
            write_port_file(settings.port_file, self.port)
        if self.local is not None:
            self._sweeper = asyncio.create_task(self._evict_idle(self.local), name="sweeper")
        self._trimming = asyncio.create_task(self._trim_when_idle(), name="memory-trimmer")
        return self.port

    async def _start_health_port(self, settings: Settings) -> None:
        """A plaintext server with grpc.health.v1 only: probes need no token or certificate."""
        server = grpc.aio.server(options=grpc_options(settings, self.reuse_port))
        registrar = Registrar(server, Guard(None))
        await self.health.attach(registrar)
        registrar.done()
        self.health_port = _bind(server, f"{settings.host}:{settings.health_port}", None)
        await server.start()
        self._health_grpc = server
        log.info(
            "health (plaintext, grpc.health.v1 only) on %s:%d", settings.host, self.health_port
        )
        if settings.health_port_file is not None:
            write_port_file(settings.health_port_file, self.health_port)

    async def _evict_idle(self, plane: DataPlane) -> None:
        """Evict idle sequences even when no request comes (requests also evict on arrival)."""
        period = max(0.05, min(self.settings.sequence_idle_seconds / 2, 5.0))
        while True:
            await asyncio.sleep(period)
            plane.sequences.evict_idle()

    async def _trim_when_idle(self) -> None:
        """Return freed heap to the system once idle after growth (core.memory)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.trimmer.idle_seconds / 2)
            idle_for = 0.0 if self.plane.active else time.monotonic() - self.plane.last_call
            if self.trimmer.due(idle_for):
                await loop.run_in_executor(None, self.trimmer.run)

    async def load_models(self) -> None:
        """Load and warm up every model version, then turn readiness SERVING."""
        count = await self.plane.load_all()
        # Loading and warm-up leave freed heap behind: return it, and measure growth from here.
        await asyncio.get_running_loop().run_in_executor(None, self.trimmer.run)
        if not self.draining:
            await self.health.set_ready(True)
            log.info("ready: %d model version(s) loaded", count)

    async def drain(self) -> None:
        """Readiness NOT_SERVING at once; keep serving for drain_seconds."""
        self.draining = True
        await self.health.set_ready(False)
        log.info("draining: NOT_SERVING, still serving for %.1f s", self.settings.drain_seconds)
        await asyncio.sleep(self.settings.drain_seconds)

    async def stop(self) -> None:
        """Refuse new calls, let in-flight ones finish within grace_seconds, release all.

        New inference calls get UNAVAILABLE from the data plane while the accepted ones
        finish; then gRPC closes the port. gRPC's own stop() CANCELs calls that reached the
        transport but no handler yet, so before it the data plane keeps answering
        UNAVAILABLE until no call came for QUIET_SECONDS (at most QUIET_LIMIT_SECONDS,
        within grace).
        """
        self.draining = True
        self.plane.refuse_new()
        for task in (self._sweeper, self._trimming):
            if task is not None:
                task.cancel()
        if self._grpc is not None:
            await self._quiet_then_stop(self._grpc)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        await self.plane.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.shutdown()
        if self.local is not None:  # a frontend's requests are counted by its engine
            totals = self.metrics.statistics.totals()
            log.info("stopped: %d requests answered, %d refused", *totals)
        else:
            log.info("stopped")

    async def _quiet_then_stop(self, server: grpc.aio.Server) -> None:
        plane, grace = self.plane, self.settings.grace_seconds
        log.info("stopping: %d in-flight requests get %.1f s", plane.active, grace)
        end = time.monotonic() + grace
        quiet_until = min(end, time.monotonic() + QUIET_LIMIT_SECONDS)
        while time.monotonic() < end and (
            plane.active
            or (time.monotonic() < quiet_until
                and time.monotonic() - plane.last_call < QUIET_SECONDS)
        ):  # fmt: skip
            await asyncio.sleep(0.005)
        await server.stop(max(0.0, end - time.monotonic()))


async def serve(
    settings: Settings, server: Server | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain and stop (`mha serve`)."""
    server = server or Server(settings)
    stop = stop or asyncio.Event()
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
