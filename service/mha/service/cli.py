"""`mha serve`: serve a model repository over the Open Inference Protocol (gRPC)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence

from mha.service.core import settings as settings_module


def add_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    """Add the server's flags (each also read from its MHA_* variable)."""
    settings_module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Build the settings, configure logs, serve until SIGTERM/SIGINT; return 0."""
    # Imported here, not at the top: `mha serve --help` should not pay for ONNX Runtime.
    from mha.cli import CliError
    from mha.service.core import logs, memory
    from mha.service.core.errors import StartupError
    from mha.service.frontends.supervisor import Supervisor, default_frontends

    try:
        settings = settings_module.from_sources(args, os.environ)
    except ValueError as err:
        raise CliError(str(err)) from None
    logs.configure(settings.log_level, settings.log_format)
    if settings.freed_heap == "keep":  # process-wide, so here and not in Server
        memory.keep_freed_heap(os.environ)
    frontends = settings.frontends or default_frontends()
    try:
        if frontends > 1:  # forks before anything imports gRPC or ONNX Runtime
            return Supervisor(settings, frontends).run()
        from mha.service.grpc import server

        asyncio.run(server.serve(settings))
    except (StartupError, OSError) as err:
        raise CliError(str(err)) from None
    return 0
