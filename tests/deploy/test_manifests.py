"""The Kubernetes manifests: rendered by kustomize, schema-valid, and saying what we mean."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from deploy_helpers import OVERLAYS, config, one, pod_spec, server

from mha.service.core import settings

# The oldest Kubernetes the manifests support (native gRPC probes are GA there) and the newest
# schema kubernetes-validate ships: a removed apiVersion fails the newest, a new field the oldest.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
EXPECTED_KINDS = {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler",
                  "PodDisruptionBudget"}  # fmt: skip
READINESS_SERVICES = {"", "inference.GRPCInferenceService"}  # docs/architecture.md, "The wire"
LIVENESS_SERVICE = "liveness"


def containers_of(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container of the Deployment, init containers included."""
    spec = pod_spec(objects)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(rendered, overlay: str, version: str) -> None:
    objects = rendered[overlay]
    assert {o["kind"] for o in objects} == EXPECTED_KINDS
    for obj in objects:
        # SchemaNotFoundError (unknown kind, removed apiVersion) and ValidationError both raise.
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_with_distinct_liveness(rendered, overlay: str) -> None:
    container = server(rendered[overlay])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container[probe_name]["grpc"]
        # Native gRPC probes take a number only; it must be the server's gRPC port.
        assert grpc["port"] == 8001 and isinstance(grpc["port"], int), probe_name
    assert container["startupProbe"]["grpc"].get("service", "") in READINESS_SERVICES
    assert container["readinessProbe"]["grpc"].get("service", "") in READINESS_SERVICES
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load window"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context_is_restricted(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    pod = pod_spec(objects)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001 and pod["runAsGroup"] == 10001  # the images' USER
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in containers_of(objects):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]
        assert "privileged" not in context, container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tmp_and_models_are_volumes(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mounts = {m["mountPath"]: m for m in server(objects)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/models"]["readOnly"] is True
    assert config(objects)["MHA_REPOSITORY"] == "/models"
    # The init container fills the models volume the server reads.
    (init,) = pod_spec(objects)["initContainers"]
    assert init["command"][:2] == ["cp", "-R"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert init_mounts[mounts["/models"]["name"]] == init["command"][-1].rstrip("/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_outlasts_prestop_drain_and_grace(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    settings_env = config(objects)
    prestop = server(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    drain = float(settings_env["MHA_DRAIN_SECONDS"])
    grace = float(settings_env["MHA_GRACE_SECONDS"])
    assert drain > 0, "readiness must go NOT_SERVING before the server stops"
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > float(prestop[1]) + drain + grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_server_settings(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    known = {spec.env for spec in settings.SPECS}
    env = dict(config(objects))
    env.update({e["name"]: e.get("value", "") for e in server(objects).get("env", [])})
    mha_names = {name for name in env if name.startswith("MHA_")}
    assert mha_names - known == set()
    assert server(objects)["envFrom"] == [
        {"configMapRef": {"name": one(objects, "ConfigMap")["metadata"]["name"]}}
    ]
    # The values parse the way the server will parse them.
    parsed = settings.from_sources(None, env)
    assert parsed.port == 8001 and parsed.metrics_port == 8002
    assert parsed.max_connection_age_seconds > 0, "long-lived clients must rebalance"
    assert parsed.device == {"cpu": "cpu", "gpu": "cuda"}[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_balance_grpc_and_expose_metrics(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"mha-serve", "mha-serve-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert (grpc["port"], grpc["appProtocol"]) == (8001, "grpc")
    headless = one(objects, "Service", "mha-serve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    metrics = next(p for p in one(objects, "Service", "mha-serve")["spec"]["ports"]
                   if p["name"] == "metrics")  # fmt: skip
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (
        annotations["prometheus.io/port"]
        == str(metrics["port"])
        == config(objects)["MHA_METRICS_PORT"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_and_budget_target_the_deployment(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    deployment = one(objects, "Deployment")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # A budget that allows no eviction at the HPA's minimum would block every node drain.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or (
        pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    )


def test_gpu_only_in_the_gpu_overlay(rendered) -> None:
    cpu, gpu = rendered["cpu"], rendered["gpu"]
    assert "nvidia.com/gpu" not in repr(cpu)
    assert server(cpu)["image"].endswith(":cpu")
    assert "tolerations" not in pod_spec(cpu) and "nodeSelector" not in pod_spec(cpu)

    assert server(gpu)["image"].endswith(":cuda")
    assert int(server(gpu)["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in server(gpu)["resources"]["requests"]
    assert {t["key"] for t in pod_spec(gpu)["tolerations"]} == {"nvidia.com/gpu"}
    assert pod_spec(gpu)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # Both overlays keep the same init container and model image.
    assert pod_spec(cpu)["initContainers"] == pod_spec(gpu)["initContainers"]
