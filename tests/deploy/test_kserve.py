"""The KServe example: a CRD, so its fields are checked here and its containers by schema."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import K8S

from mha.service.core import settings

# The one kind allowed outside the Kubernetes schemas: KServe's CRD.
ALLOWED_CRDS = {("serving.kserve.io/v1beta1", "InferenceService")}
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())


@pytest.fixture(scope="module")
def isvc() -> dict:
    """The InferenceService example, parsed."""
    docs = [d for d in yaml.safe_load_all((K8S / "kserve" / "inferenceservice.yaml").read_text())]
    assert len(docs) == 1
    return docs[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_it_is_a_crd_and_its_containers_validate(isvc: dict, version: str) -> None:
    assert (isvc["apiVersion"], isvc["kind"]) in ALLOWED_CRDS
    # Not a built-in kind: the Kubernetes schemas must not know it (else it needs no allow-list).
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(isvc, version, strict=True)
    # The predictor's containers are core v1 Containers: validate them inside a Pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": isvc["metadata"]["name"]},
        "spec": {
            "containers": isvc["spec"]["predictor"]["containers"],
            "volumes": isvc["spec"]["predictor"]["volumes"],
        },
    }
    kubernetes_validate.validate(pod, version, strict=True)


def test_custom_predictor_fields(isvc: dict) -> None:
    assert isvc["metadata"]["name"]
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # the name KServe's storage initializer uses
    assert container["image"].startswith("mha-serve:")
    # One port, named h2c: Knative routes HTTP/2 cleartext (gRPC) to it.
    assert container["ports"] == [{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] and env["MHA_REPOSITORY"] == "/mnt/models"
    known = {spec.env for spec in settings.SPECS}
    assert {n for n in env if n.startswith("MHA_")} <= known
    settings.from_sources(None, env)  # the values parse
    probe = container["readinessProbe"]["grpc"]
    assert probe == {"port": 8001, "service": "inference.GRPCInferenceService"}
    context = container["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in predictor["volumes"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
