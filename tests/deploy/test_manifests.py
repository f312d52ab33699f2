"""The Kubernetes manifests: rendered by kustomize, schema-valid, and saying what we mean."""

from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import K8S, OVERLAYS, config, one, pod_spec, server

from mha.service.core import settings

# The oldest Kubernetes the manifests support (native gRPC probes are GA there) and the newest
# schema kubernetes-validate ships: a removed apiVersion fails the newest, a new field the oldest.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
EXPECTED_KINDS = {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler",
                  "PodDisruptionBudget"}  # fmt: skip
READINESS_SERVICES = {"", "inference.GRPCInferenceService"}  # docs/architecture.md, "The wire"
LIVENESS_SERVICE = "liveness"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# The Secrets the secure overlay mounts (created by the user or cert-manager, never rendered),
# with the keys the server reads from them.
SECRET_KEYS = {"mha-serve-tls": {"tls.crt", "tls.key", "ca.crt"}, "mha-serve-auth": {"tokens"}}
SECURE_FILES = ("MHA_TLS_CERT_FILE", "MHA_TLS_KEY_FILE", "MHA_TLS_CLIENT_CA_FILE",
                "MHA_AUTH_TOKEN_FILE")  # fmt: skip
CERTIFICATE_EXAMPLE = K8S / "overlays" / "secure" / "certificate.example.yaml"
CERT_MANAGER_KINDS = {("cert-manager.io/v1", kind) for kind in ("Certificate", "Issuer",
                                                                   "ClusterIssuer")}  # fmt: skip


def containers_of(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container of the Deployment, init containers included."""
    spec = pod_spec(objects)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def server_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The server's environment: the ConfigMap's settings, then the container's own env."""
    env = dict(config(objects))
    env.update({e["name"]: e.get("value", "") for e in server(objects).get("env", [])})
    return env


def parsed_settings(objects: list[dict[str, Any]]) -> settings.Settings:
    """The settings the server builds from that environment (raises if a value does not parse)."""
    return settings.from_sources(None, server_env(objects))


def secret_mounts(objects: list[dict[str, Any]]) -> dict[PurePosixPath, str]:
    """Mount path -> Secret name, for the server's Secret volumes."""
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    return {
        PurePosixPath(m["mountPath"]): volumes[m["name"]]["secret"]["secretName"]
        for m in server(objects)["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }


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
    objects = rendered[overlay]
    container = server(objects)
    parsed = parsed_settings(objects)
    # The kubelet's gRPC probes speak plaintext and send no token or client certificate: with
    # TLS or tokens on the gRPC port they must go to the plaintext health port.
    secured = parsed.tls_cert_file is not None or parsed.auth_token_file is not None
    probe_port = parsed.health_port if secured else parsed.port
    assert probe_port is not None, "a secured gRPC port needs MHA_HEALTH_PORT for the probes"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health = {} if parsed.health_port is None else {"health": parsed.health_port}
    assert ports == {"grpc": 8001, "metrics": 8002, **health}
    for probe_name in PROBES:
        grpc = container[probe_name]["grpc"]
        # Native gRPC probes take a number only; it must be the port that answers them.
        assert grpc["port"] == probe_port and isinstance(grpc["port"], int), probe_name
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
    env = server_env(objects)
    mha_names = {name for name in env if name.startswith("MHA_")}
    assert mha_names - known == set()
    assert server(objects)["envFrom"] == [
        {"configMapRef": {"name": one(objects, "ConfigMap")["metadata"]["name"]}}
    ]
    # The values parse the way the server will parse them.
    parsed = settings.from_sources(None, env)
    assert parsed.port == 8001 and parsed.metrics_port == 8002
    assert parsed.max_connection_age_seconds > 0, "long-lived clients must rebalance"
    assert parsed.device == {"cpu": "cpu", "gpu": "cuda", "secure": "cpu"}[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_path_settings_point_into_mounted_volumes(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    env = server_env(objects)
    mounts = {PurePosixPath(m["mountPath"]) for m in server(objects)["volumeMounts"]}
    path_settings = [
        spec.env for spec in settings.SPECS if spec.parse is Path and env.get(spec.env)
    ]
    assert "MHA_REPOSITORY" in path_settings
    for name in path_settings:
        # The root filesystem is the image's (read-only): a file the server needs comes in a volume.
        path = PurePosixPath(env[name])
        assert path.is_absolute(), f"{name}={path}"
        assert mounts & ({path} | set(path.parents)), f"{name}={path} is in no volume mount"


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
    for cpu_only in (cpu, rendered["secure"]):
        assert "nvidia.com/gpu" not in repr(cpu_only)
        assert server(cpu_only)["image"].endswith(":cpu")
        assert "tolerations" not in pod_spec(cpu_only) and "nodeSelector" not in pod_spec(cpu_only)

    assert server(gpu)["image"].endswith(":cuda")
    assert int(server(gpu)["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in server(gpu)["resources"]["requests"]
    assert {t["key"] for t in pod_spec(gpu)["tolerations"]} == {"nvidia.com/gpu"}
    assert pod_spec(gpu)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # Both overlays keep the same init container and model image.
    assert pod_spec(cpu)["initContainers"] == pod_spec(gpu)["initContainers"]


def test_only_the_secure_overlay_mounts_secrets(rendered) -> None:
    for overlay, objects in rendered.items():
        mounted = set(secret_mounts(objects).values())
        assert mounted == (set(SECRET_KEYS) if overlay == "secure" else set()), overlay
        parsed = parsed_settings(objects)
        secured = parsed.tls_cert_file or parsed.auth_token_file or parsed.health_port
        assert bool(secured) == (overlay == "secure"), overlay


def test_secure_turns_on_tls_mtls_tokens_and_the_health_port(rendered) -> None:
    parsed = parsed_settings(rendered["secure"])
    assert parsed.tls_cert_file and parsed.tls_key_file and parsed.auth_token_file
    assert parsed.tls_client_ca_file, "mTLS is the overlay's default (deploy/README.md)"
    assert parsed.health_port is not None and parsed.health_port != parsed.port
    container = server(rendered["secure"])
    for probe_name in PROBES:
        assert container[probe_name]["grpc"]["port"] == parsed.health_port != parsed.port


def test_secure_secrets_are_read_only_directories(rendered) -> None:
    objects = rendered["secure"]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    secret_volumes = {name for name, volume in volumes.items() if "secret" in volume}
    mounts = [m for m in server(objects)["volumeMounts"] if m["name"] in secret_volumes]
    assert {m["name"] for m in mounts} == secret_volumes
    for mount in mounts:
        assert mount["readOnly"] is True, mount
        # A subPath mount is bound to the file of the day: it never sees a renewed Secret.
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
        secret = volumes[mount["name"]]["secret"]
        assert secret.get("optional") is not True, "a missing Secret must keep the pod pending"
        assert "items" not in secret, "every key of the Secret, as the kubelet renews it"
        assert secret.get("defaultMode", 0o644) & 0o007 == 0, "keys not world-readable"
    for init in pod_spec(objects)["initContainers"]:  # only the server reads keys
        assert not {m["name"] for m in init["volumeMounts"]} & secret_volumes


def test_secure_files_are_keys_of_the_mounted_secrets(rendered) -> None:
    objects = rendered["secure"]
    env, mounted = server_env(objects), secret_mounts(objects)
    secret_of = {}
    for name in SECURE_FILES:
        path = PurePosixPath(env[name])
        # A key sits at the root of its Secret's directory (the symlink the kubelet swaps).
        assert path.parent in mounted, f"{name}={path} is not in a Secret's directory"
        secret_of[name] = mounted[path.parent]
        assert path.name in SECRET_KEYS[secret_of[name]], f"{name}={path}"
    # One Secret for certificate and key, renewed together: never a key of another certificate.
    assert secret_of["MHA_TLS_CERT_FILE"] == secret_of["MHA_TLS_KEY_FILE"]
    assert secret_of["MHA_TLS_CLIENT_CA_FILE"] == secret_of["MHA_TLS_CERT_FILE"]
    assert secret_of["MHA_AUTH_TOKEN_FILE"] != secret_of["MHA_TLS_CERT_FILE"]


def test_secure_changes_only_what_it_says(rendered) -> None:
    """Undo the secure overlay's additions: what is left is the cpu overlay, unchanged."""
    secure, cpu = rendered["secure"], rendered["cpu"]
    data = dict(config(secure))
    for name in (*SECURE_FILES, "MHA_HEALTH_PORT"):
        del data[name]
    assert data == config(cpu)

    deployment = copy.deepcopy(one(secure, "Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in secret_volumes]
    (container,) = [c for c in spec["containers"] if c["name"] == "server"]
    container["volumeMounts"] = [
        m for m in container["volumeMounts"] if m["name"] not in secret_volumes
    ]
    container["ports"] = [p for p in container["ports"] if p["name"] != "health"]
    for probe_name in PROBES:  # the port moves; service names and timings stay the base's
        container[probe_name]["grpc"]["port"] = server(cpu)[probe_name]["grpc"]["port"]
    container["envFrom"] = server(cpu)["envFrom"]  # the ConfigMap's hashed name differs
    assert deployment == one(cpu, "Deployment")
    for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert [o for o in secure if o["kind"] == kind] == [o for o in cpu if o["kind"] == kind]


def test_health_port_stays_off_the_services(rendered) -> None:
    # The kubelet probes the pod's IP; through a Service the plaintext port would serve nobody.
    objects = rendered["secure"]
    health_port = parsed_settings(objects).health_port
    for service in (o for o in objects if o["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert health_port not in (port["port"], port["targetPort"]), service["metadata"]
            assert port["targetPort"] != "health", service["metadata"]


def test_certificate_example_issues_the_mounted_secret(rendered) -> None:
    docs = [d for d in yaml.safe_load_all(CERTIFICATE_EXAMPLE.read_text()) if d]
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) in CERT_MANAGER_KINDS, doc["kind"]
        # cert-manager's CRDs: no Kubernetes schema knows them, so these checks are all there is.
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    objects = rendered["secure"]
    assert not [o for o in objects if o["apiVersion"].startswith("cert-manager.io/")]
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    for spec in certificates.values():
        if spec["issuerRef"].get("kind", "Issuer") == "Issuer":
            assert spec["issuerRef"]["name"] in issuers, spec["issuerRef"]
    for spec in issuers.values():
        if "ca" in spec:
            assert certificates[spec["ca"]["secretName"]]["isCA"] is True

    tls_secret = secret_mounts(objects)[
        PurePosixPath(server_env(objects)["MHA_TLS_CERT_FILE"]).parent
    ]
    served = certificates[tls_secret]
    assert "server auth" in served["usages"]
    assert served["privateKey"]["rotationPolicy"] == "Always"
    names = set(served["dnsNames"])
    for service in (o["metadata"]["name"] for o in objects if o["kind"] == "Service"):
        assert service in names
        assert any(n.startswith(f"{service}.") and n.endswith(".svc.cluster.local") for n in names)
    # mTLS trusts the server Secret's ca.crt: the CA of its issuer, so clients need that issuer.
    clients = [c for c in certificates.values() if "client auth" in c.get("usages", [])]
    assert clients and all(c["issuerRef"] == served["issuerRef"] for c in clients)
