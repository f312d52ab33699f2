"""The container images: lint-clean Dockerfiles that install the serving set only, run as a
numeric non-root user, and (with podman, on images already built from this tree) run read-only
without torch and fill a model volume. `make smoke` and deploy/kube_smoke.sh (both in .ci/run)
build the images and serve from them."""

from __future__ import annotations

import json
import re
import resource
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, ROOT, tool
from packaging.requirements import Requirement

from mha.service.core import settings

DOCKERFILES = sorted(DEPLOY.glob("Dockerfile*"))
SOURCE_LABEL = "io.mha-serve.source-digest"  # deploy/image.sh
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


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    """Run podman with runc (as deploy/image.sh does) and this process's open-file limits."""
    return subprocess.run(
        ["podman", "--runtime", "runc", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def built_from_this_tree(image: str) -> str:
    """`image` when podman holds it built from these sources (deploy/image.sh labels each build
    with their digest); the tests skip otherwise: they never build (`make image` does)."""
    digest = subprocess.run(
        ["bash", str(DEPLOY / "image.sh"), "digest"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    label = podman("image", "inspect", "--format", f'{{{{index .Labels "{SOURCE_LABEL}"}}}}', image)
    if label.returncode != 0:
        pytest.skip(f"no image {image}: deploy/image.sh builds it")
    if label.stdout.strip() != digest:
        pytest.skip(f"{image} was built from other sources than this tree's: rebuild it")
    return image


def limits() -> list[str]:
    """--ulimit flags that keep this process's limits: podman's defaults are refused in a
    sandbox without CAP_SYS_RESOURCE (see deploy/image.sh)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", "nproc=8192:8192"]


# Run inside the serving image: what the server needs is there, torch and a writable root not.
INSIDE = """
import importlib.util, json, os, shutil
import grpc, numpy, onnxruntime
try:
    open("/probe", "w").close()
    root = "writable"
except OSError:
    root = "read-only"
print(json.dumps({"uid": os.getuid(), "torch": importlib.util.find_spec("torch") is not None,
                  "providers": onnxruntime.get_available_providers(), "root": root,
                  "sleep": shutil.which("sleep")}))
"""


@pytest.mark.podman
def test_serving_image_runs_read_only_as_10001_without_torch() -> None:
    image = built_from_this_tree("mha-serve:cpu")
    config = podman("image", "inspect", "--format", "{{json .Config}}", image)
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["User"] == "10001:10001"
    assert json.loads(config.stdout)["Entrypoint"] == ["mha", "serve"]
    run = podman("run", "--rm", "--read-only", "--cap-drop", "ALL", *limits(),
                 "--entrypoint", "python3", image, "-c", INSIDE)  # fmt: skip
    assert run.returncode == 0, run.stderr
    inside = json.loads(run.stdout)
    assert inside["uid"] == 10001 and inside["root"] == "read-only", inside
    assert not inside["torch"] and "CPUExecutionProvider" in inside["providers"], inside
    assert inside["sleep"], "the preStop hook execs sleep"


@pytest.mark.podman
def test_model_image_copies_its_repository_into_a_volume(tmp_path: Path) -> None:
    image = built_from_this_tree("mha-models:latest")
    volume = tmp_path / "models"
    volume.mkdir()
    volume.chmod(0o777)  # the emptyDir: the image's uid 10001 writes into it
    run = podman("run", "--rm", "--read-only", "--cap-drop", "ALL", *limits(),
                 "--volume", f"{volume}:/mnt/models", image)  # fmt: skip
    assert run.returncode == 0, run.stderr
    version = volume / "mha" / "1"
    assert {p.name for p in version.iterdir()} >= {"model.onnx", "mha.json"}
    assert json.loads((version / "mha.json").read_text())
    assert all(p.stat().st_mode & 0o004 for p in version.iterdir())  # any uid reads them
