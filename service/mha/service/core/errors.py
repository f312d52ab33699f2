"""One exception hierarchy for everything the server refuses; each class carries its status.

The servicer maps these to gRPC status codes in one place (mha.service.grpc.servicer). Messages
go to the client verbatim, so they must name the tensor and the expected vs received value
and never carry internals; anything that is not a ServiceError becomes INTERNAL with a
fixed message, details only in the server log.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A refusal the client is told about: status code + message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "error"  # label for metrics ("outcome" of a request)

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class Unavailable(ServiceError):
    """Not ready, draining, or queue full."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


class QueueFull(Unavailable):
    reason = "queue_full"


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "resource_exhausted"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline_exceeded"


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED
    reason = "cancelled"


class StartupError(Exception):
    """The server cannot start (bad repository, CUDA asked for but absent, ...)."""


INTERNAL_MESSAGE = "internal error; the server log has the details under this request id"
