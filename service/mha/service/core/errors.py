"""One exception hierarchy for everything the server refuses; each class carries its status.

Status names are the gRPC ones (docs/architecture.md, "The wire"), but this module
imports no transport: the gRPC layer maps a Status to grpc.StatusCode by name in one place
(mha.service.grpc.servicer). Messages go to the client verbatim, so they must name the
tensor and the expected vs received value and never carry internals; anything that is not
a ServiceError becomes INTERNAL with a fixed message, details only in the server log.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """The outcome classes a client sees; names equal grpc.StatusCode member names."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    OUT_OF_RANGE = "out_of_range"
    UNAUTHENTICATED = "unauthenticated"
    INTERNAL = "internal"


class ServiceError(Exception):
    """A refusal the client is told about: status + message."""

    code: Status = Status.INTERNAL
    reason: str = "error"  # label for metrics ("outcome" of a request)

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    code = Status.INVALID_ARGUMENT
    reason = "invalid_argument"


class NotFound(ServiceError):
    code = Status.NOT_FOUND
    reason = "not_found"


class Unavailable(ServiceError):
    """Not ready, draining, or queue full."""

    code = Status.UNAVAILABLE
    reason = "unavailable"


class QueueFull(Unavailable):
    reason = "queue_full"


class ResourceExhausted(ServiceError):
    code = Status.RESOURCE_EXHAUSTED
    reason = "resource_exhausted"


class DeadlineExceeded(ServiceError):
    code = Status.DEADLINE_EXCEEDED
    reason = "deadline_exceeded"


class OutOfRange(ServiceError):
    """A sequence past its model's maximum context."""

    code = Status.OUT_OF_RANGE
    reason = "out_of_range"


class Cancelled(ServiceError):
    code = Status.CANCELLED
    reason = "cancelled"


class StartupError(Exception):
    """The server cannot start (bad repository, CUDA asked for but absent, ...)."""


INTERNAL_MESSAGE = "internal error; the server log has the details under this request id"
