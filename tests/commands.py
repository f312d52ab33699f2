"""`mha ARGS` run through mha.cli.main in the test process, answered as a subprocess would be.

A subprocess of `mha export` spends seconds importing torch before it does anything; the
tests that check what a command writes and prints run it here instead. Each file that does
also keeps a test of the real command, so that the two cannot drift apart.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def mha_in_process(
    capsys: pytest.CaptureFixture[str], *args: str | Path | int
) -> subprocess.CompletedProcess:
    """Exit status, stdout and stderr of `mha ARGS`, run by mha.cli.main here."""
    from mha.cli import main

    argv = [str(a) for a in args]
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = int(exit_.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["mha", *argv], status, captured.out, captured.err)
