"""Errors shared by every part of `mha`: this module imports nothing of the project.

export/, service/, the client and the benchmarks raise CliError for a mistake a person
made on the command line; the `mha` dispatcher (mha.cli) prints it as one line.
"""

from __future__ import annotations


class CliError(Exception):
    """An error for a person: printed as one line, exit status 2, no traceback."""
