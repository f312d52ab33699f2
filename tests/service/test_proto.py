"""The committed generated code matches proto/ (`make proto` regenerates it)."""

from __future__ import annotations

import subprocess
import sys


def test_generated_code_has_not_drifted():
    done = subprocess.run(
        [sys.executable, "-m", "mha.service.protogen", "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
