"""What deploy/kube_smoke.sh plays under podman: the cpu overlay's pod as rendered, changed only
where podman needs it (deploy/kube_for_podman.py)."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, one, pod_spec


def load() -> ModuleType:
    """deploy/kube_for_podman.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("kube_for_podman", DEPLOY / "kube_for_podman.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kube_for_podman = load()


def undo_podman_changes(played: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The play file with its images named as the overlay names them, for a comparison."""
    undone = copy.deepcopy(played)
    pod = pod_spec(undone)
    for container in pod["initContainers"] + pod["containers"]:
        assert container["image"].startswith("localhost/"), container["image"]
        container["image"] = container["image"].removeprefix("localhost/")
    return undone


def test_the_cluster_pod_restarts_always(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # A Deployment's pods must restart Always (the API server refuses anything else), so the
    # override below exists for podman only.
    assert pod_spec(rendered["cpu"]).get("restartPolicy", "Always") == "Always"


def test_podman_before_4_4_plays_the_pod_with_on_failure_and_nothing_else_changed(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    cluster = rendered["cpu"]
    played = undo_podman_changes(kube_for_podman.for_podman(cluster, (4, 3, 1)))
    assert [d["kind"] for d in played] == [
        d["kind"] for d in cluster if d["kind"] in ("ConfigMap", "Deployment")
    ]
    assert one(played, "ConfigMap") == one(cluster, "ConfigMap")
    deployment = one(played, "Deployment")
    assert deployment["spec"].pop("replicas") == 1
    assert deployment["spec"]["template"]["spec"].pop("restartPolicy") == "OnFailure"
    expected = copy.deepcopy(one(cluster, "Deployment"))
    expected["spec"].pop("replicas")
    expected["spec"]["template"]["spec"].pop("restartPolicy", None)
    assert deployment == expected  # init container, volumes, security contexts, probes, env
    assert pod_spec(played)["initContainers"], "the init container is played"


@pytest.mark.parametrize("podman", [(4, 4, 0), (5, 2, 1)])
def test_newer_podman_plays_the_restart_policy_as_rendered(
    rendered: dict[str, list[dict[str, Any]]], podman: tuple[int, ...]
) -> None:
    cluster = rendered["cpu"]
    played = undo_podman_changes(kube_for_podman.for_podman(cluster, podman))
    assert pod_spec(played).get("restartPolicy") == pod_spec(cluster).get("restartPolicy")


def test_versions_parse_and_nonsense_is_refused() -> None:
    assert kube_for_podman.version("4.3.1") == (4, 3, 1)
    assert kube_for_podman.version("5.0.0-dev\n") == (5, 0, 0)
    assert kube_for_podman.version("4.3.1") < kube_for_podman.INIT_RESTART_FIXED_IN
    with pytest.raises(ValueError, match="not a podman version"):
        kube_for_podman.version("podman version 4.3.1")


def test_the_command_line_reads_yaml_and_writes_the_play_file(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "kube_for_podman.py"), "4.3.1"],
        input=yaml.safe_dump_all(rendered["cpu"]),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    played = list(yaml.safe_load_all(result.stdout))
    assert played == kube_for_podman.for_podman(rendered["cpu"], (4, 3, 1))
