"""Cut a rendered overlay to what `podman kube play` runs, changing only what podman needs.

Used by deploy/kube_smoke.sh:

    kubectl kustomize deploy/k8s/overlays/cpu | python deploy/kube_for_podman.py 4.3.1 > play.yaml

Kept: the ConfigMap and the Deployment, whose pod spec is the cluster's (init container,
emptyDir, security contexts, probes, settings) but for three changes: one replica, the images
as podman names local builds (localhost/...), and, for podman before 4.4, the pod's
restartPolicy (below). Everything else (Services, HPA, PDB) podman does not run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import yaml

KINDS = ("ConfigMap", "Deployment")
# Before 4.4, `podman kube play` gives init containers the pod's restart policy, which is
# Always for a Deployment: the init container's clean exit restarts it, and podman's removal of
# the finished ("once") init container then finds it running and fails the play ("cannot
# remove container ... as it is running"). The kubelet never restarts an init container that
# succeeded, whatever the pod's policy; OnFailure gives podman's init container exactly that,
# and the server a restart on a crash. Fixed in podman 4.4: init containers get policy "no"
# (commit 10e020c651, "Init containers should not be restarted").
INIT_RESTART_FIXED_IN = (4, 4)


def version(text: str) -> tuple[int, ...]:
    """(4, 3, 1) from '4.3.1' (or '4.3.1-dev'); ValueError on anything else."""
    parts = text.strip().split("-")[0].split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a podman version: {text!r}")
    return tuple(int(p) for p in parts)


def for_podman(docs: list[dict[str, Any]], podman: tuple[int, ...]) -> list[dict[str, Any]]:
    """The ConfigMap and Deployment of `docs`, made playable by podman of version `podman`."""
    kept = [copy.deepcopy(d) for d in docs if d and d["kind"] in KINDS]
    for doc in kept:
        if doc["kind"] != "Deployment":
            continue
        doc["spec"]["replicas"] = 1
        pod = doc["spec"]["template"]["spec"]
        for container in pod["initContainers"] + pod["containers"]:
            container["image"] = "localhost/" + container["image"]
        if podman < INIT_RESTART_FIXED_IN and pod.get("restartPolicy", "Always") == "Always":
            pod["restartPolicy"] = "OnFailure"
    return kept


def main(argv: list[str] | None = None) -> int:
    """Read rendered YAML on stdin, write podman's play file on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("podman_version", type=version, help="of the podman that plays it")
    args = parser.parse_args(argv)
    docs = list(yaml.safe_load_all(sys.stdin))
    sys.stdout.write(yaml.safe_dump_all(for_podman(docs, args.podman_version)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
