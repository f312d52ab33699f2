"""grpc.health.v1 services: liveness at once, readiness when every model is loaded.

Service names: "liveness" is SERVING as soon as the process answers; "" and
inference.GRPCInferenceService (readiness) turn SERVING after every model version is loaded
and warmed up, and NOT_SERVING again at once when the server starts draining.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mha.service.grpc.reflection import INFERENCE_SERVICE

LIVENESS = "liveness"
READINESS_NAMES = ("", INFERENCE_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The health servicer of one server and the two states it reports."""

    def __init__(self) -> None:
        # health.aio is imported lazily inside grpc_health, so mypy does not see it.
        self.servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._attached = False

    async def attach(self, server: Any) -> None:
        """Add the service to a server (or a guard.Registrar): live, not ready."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        if not self._attached:  # a second server (the health port) shares the states
            self._attached = True
            await self.servicer.set(LIVENESS, SERVING)
            await self.set_ready(False)

    async def set_ready(self, ready: bool) -> None:
        for name in READINESS_NAMES:
            await self.servicer.set(name, SERVING if ready else NOT_SERVING)
