"""`mha bench`: the dispatcher imports only the benchmark that was named."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import contextlib, io, sys
from mha.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript"))
print(heavy, "serve" in out.getvalue() and "export" in out.getvalue())
"""


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "serve", "--help"]])
def test_bench_help_loads_no_export_tools(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    heavy, _ = done.stdout.rsplit(" ", 1)
    assert heavy == "[]", done.stdout


def test_bench_help_lists_every_benchmark() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "bench", "--help"], capture_output=True, text=True
    )
    assert done.stdout.strip().endswith("True"), done.stdout


def test_bench_export_still_gets_its_flags() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mha.cli", "bench", "export", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "--shapes" in done.stdout, done.stderr
