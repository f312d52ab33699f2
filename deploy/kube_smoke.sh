#!/usr/bin/env bash
# Run the cpu overlay's Deployment for real under `podman kube play`: the init container copies
# the model image into the emptyDir, the server runs read-only as uid 10001 with the ConfigMap's
# settings. Checks health and one inference from inside the pod, then tears it down.
#
#   deploy/kube_smoke.sh            (builds mha-serve:cpu and mha-models:latest first)
#
# The model image's export stage installs torch: PIP_FIND_LINKS (a local wheel folder) and
# PIP_EXTRA_INDEX_URL from the environment reach the build (see deploy/image.sh).
set -euo pipefail

# shellcheck source=deploy/image.sh
source "$(dirname "${BASH_SOURCE[0]}")/image.sh"
PLAY=$WORK/kube-cpu.yaml
CONTAINER=mha-serve-pod-0-server  # podman's name for the Deployment's first pod's container

# kube play takes no --ulimit: the same limits as image.sh, through a containers.conf.
export CONTAINERS_CONF=$WORK/containers.conf

cleanup() {
    if "${PODMAN[@]}" container exists "$CONTAINER" 2> /dev/null; then
        log "server log (last lines)"
        "${PODMAN[@]}" logs "$CONTAINER" 2>&1 | tail -n 5 || true
    fi
    if [[ -f $PLAY ]]; then
        "${PODMAN[@]}" kube down "$PLAY" > /dev/null 2>&1 || true
    fi
}

# The overlay as rendered for a cluster, cut to what podman runs: ConfigMap + Deployment, one
# replica, the images named as podman stores local builds.
render() {
    "$VENV/bin/kubectl" kustomize deploy/k8s/overlays/cpu | "$VENV/bin/python" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] in ("ConfigMap", "Deployment")]
for d in docs:
    if d["kind"] == "Deployment":
        d["spec"]["replicas"] = 1
        pod = d["spec"]["template"]["spec"]
        for c in pod["initContainers"] + pod["containers"]:
            c["image"] = "localhost/" + c["image"]
print(yaml.safe_dump_all(docs))' > "$PLAY"
}

# smoke_check.py is not in the image: feed it to the image's Python on stdin.
check() {
    "${PODMAN[@]}" exec -i "$CONTAINER" python3 - "$@" < deploy/smoke_check.py
}

main() {
    mkdir -p "$WORK"
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=8192:8192"]\n' \
        "$(ulimit -Sn)" "$(ulimit -Hn)" > "$CONTAINERS_CONF"
    IMAGE=mha-serve:cpu DOCKERFILE=deploy/Dockerfile build_image
    IMAGE=mha-models:latest DOCKERFILE=deploy/Dockerfile.models build_image
    render
    trap cleanup EXIT
    log "podman kube play (cpu overlay: ConfigMap + Deployment)"
    "${PODMAN[@]}" kube play --replace "$PLAY" > /dev/null
    log "inside the pod"
    # shellcheck disable=SC2016  # expanded by the container's shell
    "${PODMAN[@]}" exec "$CONTAINER" sh -c 'echo "uid $(id -u), models: $(ls /models)"; \
        touch /probe 2> /dev/null && echo "root fs WRITABLE" || echo "root fs read-only"; \
        env | grep "^MHA_" | sort | tr "\n" " "; echo'
    check wait --target 127.0.0.1:8001 --timeout 120
    check infer --target 127.0.0.1:8001 --model mha
    log "kube smoke test passed"
}

main "$@"
