"""Structured logs (text or JSON lines), each record carrying the request id it belongs to.

The servicer sets `request_id` (a context variable) at the start of every RPC; a filter
copies it onto each record, so a log line written anywhere in that request's task, in
this package or not, names the request.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import sys
import time
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Ids for requests that bring none: this process's random prefix and a count. A uuid4 costs
# an os.urandom call (~1.8 us) on every such request; this ~0.1 us.
_ID_PREFIX = os.urandom(3).hex()
_ID_COUNT = itertools.count(1)


def _new_prefix() -> None:
    """A forked process (mha.service.frontends) draws its own prefix: ids stay unique."""
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(3).hex()


os.register_at_fork(after_in_child=_new_prefix)


def new_request_id() -> str:
    """An id unique within this server's logs (prefix-count, hex)."""
    return f"{_ID_PREFIX}-{next(_ID_COUNT):x}"


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Put the current request id on every record (as record.request_id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send logs to stderr in the chosen format; replaces handlers set up earlier."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
