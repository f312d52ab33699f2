"""The container images: lint-clean Dockerfiles that install the serving set only, run as a
numeric non-root user, and (with podman) build and answer a request on this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, ROOT, tool
from packaging.requirements import Requirement

from mha.service.core import settings

DOCKERFILES = sorted(DEPLOY.glob("Dockerfile*"))
SERVING = {"Dockerfile": "cpu", "Dockerfile.cuda": "gpu"}  # file -> the extra it installs


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last build stage, its FROM included."""
    steps = instructions(path)
    start = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[start:]


def serving_requirements(extra: str) -> list[Requirement]:
    """pyproject's base dependencies plus one extra: what a serving image installs."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"][extra]
    return [Requirement(r) for r in names]


def test_every_dockerfile_is_hadolint_clean() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.cuda", "Dockerfile.models"}
    for path in DOCKERFILES:
        result = subprocess.run(
            [tool("hadolint"), "--no-color", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), path.name


@pytest.mark.parametrize("extra", sorted(set(SERVING.values())))
def test_serving_requirements_carry_no_torch(extra: str) -> None:
    names = {r.name.lower() for r in serving_requirements(extra)}
    assert not {n for n in names if n.startswith("torch")}, names
    assert {"onnxruntime", "onnxruntime-gpu"} & names == {
        "cpu": {"onnxruntime"},
        "gpu": {"onnxruntime-gpu"},
    }[extra]


@pytest.mark.parametrize("name", sorted(SERVING))
def test_serving_image_installs_only_its_extra(name: str) -> None:
    runs = " ".join(args for step, args in instructions(DEPLOY / name) if step == "RUN")
    extras = set(re.findall(r'\.whl\)\[([a-z,]+)\]"', runs))
    assert extras == {SERVING[name]}, extras
    assert "-e " not in runs and "--editable" not in runs  # a wheel, not the source tree
    assert re.search(r"--constraint \S*constraints\.txt", runs)  # the pinned versions


@pytest.mark.parametrize("name", sorted(SERVING))
def test_serving_image_runtime_stage(name: str) -> None:
    steps = instructions(DEPLOY / name)
    assert steps[0] == ("ARG", "BASE=python:3.11-slim-bookworm")
    assert all(args.startswith("${BASE} AS ") for step, args in steps if step == "FROM")
    final = final_stage(DEPLOY / name)
    by_name: dict[str, list[str]] = {}
    for step, args in final:
        by_name.setdefault(step, []).append(args)
    assert by_name["COPY"] == ["--from=builder /opt/venv /opt/venv"]  # the venv, nothing else
    (user,) = by_name["USER"]
    assert re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", user), user  # numeric, non-root
    (entrypoint,) = by_name["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["mha", "serve"]  # exec form: signals reach the server
    assert sorted(" ".join(by_name["EXPOSE"]).split()) == ["8001", "8002"]
    env = " ".join(by_name["ENV"])
    assert "MHA_REPOSITORY=/models" in env and "TMPDIR=/tmp" in env
    known = {spec.env for spec in settings.SPECS}
    assert set(re.findall(r"\b(MHA_[A-Z_]+)=", env)) <= known
    if name == "Dockerfile.cuda":
        (cmd,) = by_name["CMD"]
        assert json.loads(cmd) == ["--device", "cuda"]  # no GPU -> fail, not a CPU fallback


def test_model_image_copies_into_a_volume() -> None:
    final = dict(final_stage(DEPLOY / "Dockerfile.models"))
    assert json.loads(final["ENTRYPOINT"]) == ["cp", "-R", "/models/.", "/mnt/models/"]
    assert re.fullmatch(r"\d+:\d+", final["USER"])
    text = (DEPLOY / "Dockerfile.models").read_text()
    assert "AS serve-baked" in text and "mha export --repository /models" in text


@pytest.mark.podman
@pytest.mark.timeout(1200)
def test_smoke_builds_runs_read_only_and_answers(tmp_path: Path) -> None:
    """deploy/smoke.sh end to end: build, run read-only as uid 10001, health, one inference."""
    # A fresh export: the model served is the one this tree's exporter writes today.
    env = dict(os.environ, VENV=str(Path(sys.executable).parent.parent), MODELS=str(tmp_path))
    result = subprocess.run(
        ["bash", str(DEPLOY / "smoke.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=1100,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "no torch in the image: True" in output
    assert "uid 10001" in output
    assert "health 'liveness': SERVING" in output
    assert "health 'inference.GRPCInferenceService': SERVING" in output
    assert (
        re.search(r"output +FP32 \[2, 5, 512\]", output) or "output float32 [2, 5, 512]" in output
    )
    assert "smoke test passed" in output
