#!/usr/bin/env bash
# Run the cpu overlay's Deployment for real under `podman kube play`: the init container copies
# the model image into the emptyDir and exits, then the server starts read-only as uid 10001
# with the ConfigMap's settings. Checks the order, the pod, health and one inference from inside
# the pod, then tears it down.
#
#   deploy/kube_smoke.sh            (builds mha-serve:cpu and mha-models:latest first)
#   BUILD=0 deploy/kube_smoke.sh    (plays the images already built: .ci/run builds them once)
#
# The model image's export stage installs torch: PIP_FIND_LINKS (a local wheel folder) and
# PIP_EXTRA_INDEX_URL from the environment reach the build (see deploy/image.sh).
set -euo pipefail

# shellcheck source=deploy/image.sh
source "$(dirname "${BASH_SOURCE[0]}")/image.sh"
PLAY=$WORK/kube-cpu.yaml
POD=mha-serve-pod-0  # podman's name for the Deployment's first pod
SERVER=$POD-server
INIT=$POD-models

# kube play takes no --ulimit: the same limits as image.sh, through a containers.conf.
export CONTAINERS_CONF=$WORK/containers.conf

cleanup() {
    if "${PODMAN[@]}" container exists "$SERVER" 2> /dev/null; then
        log "server log (last lines)"
        "${PODMAN[@]}" logs "$SERVER" 2>&1 | tail -n 5 || true
    fi
    if [[ -f $PLAY ]]; then
        "${PODMAN[@]}" kube down "$PLAY" > /dev/null 2>&1 || true
    fi
}

fail() {
    echo "kube smoke FAILED: $*" >&2
    exit 1
}

# The overlay as rendered for a cluster, cut to what podman runs (deploy/kube_for_podman.py).
render() {
    local version
    version=$("${PODMAN[@]}" version --format '{{.Client.Version}}')
    "$VENV/bin/kubectl" kustomize deploy/k8s/overlays/cpu \
        | "$VENV/bin/python" deploy/kube_for_podman.py "$version" > "$PLAY"
    echo "podman $version; the pod's $(grep -m1 -o 'restartPolicy: .*' "$PLAY" || echo 'restartPolicy as rendered')"
}

# The init container ran once, exited 0 and was removed before the server started (podman's
# event log of this play, in order).
check_order() {
    local since=$1 events init_runs init_died server_start
    # --stream=false, not --until: podman 4.3's --until waits for an event past the time given.
    events=$("${PODMAN[@]}" events --stream=false --since "$since" --filter type=container \
        --format '{{.Name}} {{.Status}}')
    init_runs=$(grep -c "^$INIT start$" <<< "$events" || true)
    init_died=$(grep -n -m1 "^$INIT died$" <<< "$events" | cut -d: -f1 || true)
    server_start=$(grep -n -m1 "^$SERVER start$" <<< "$events" | cut -d: -f1 || true)
    [[ $init_runs == 1 ]] || fail "the init container started $init_runs times: $events"
    [[ -n $init_died && -n $server_start ]] || fail "no init exit or no server start: $events"
    ((init_died < server_start)) || fail "the server started before the init container exited"
    ! "${PODMAN[@]}" container exists "$INIT" || fail "the finished init container is still there"
    echo "init container $INIT: started once, exited, removed; then $SERVER started"
}

# smoke_check.py is not in the image: feed it to the image's Python on stdin.
check() {
    "${PODMAN[@]}" exec -i "$SERVER" python3 - "$@" < deploy/smoke_check.py
}

check_pod() {
    local uid models root env
    uid=$("${PODMAN[@]}" exec "$SERVER" id -u)
    models=$("${PODMAN[@]}" exec "$SERVER" sh -c 'cd /models && ls mha/1')
    root=$("${PODMAN[@]}" exec "$SERVER" sh -c 'touch /probe 2> /dev/null && echo writable || echo read-only')
    env=$("${PODMAN[@]}" exec "$SERVER" env | grep '^MHA_' | sort | tr '\n' ' ')
    echo "uid $uid, /models/mha/1: $(tr '\n' ' ' <<< "$models"), root fs $root"
    echo "settings: $env"
    [[ $uid == 10001 ]] || fail "the server runs as uid $uid"
    grep -qx model.onnx <<< "$models" && grep -qx mha.json <<< "$models" \
        || fail "the emptyDir holds no model"
    [[ $root == read-only ]] || fail "the root filesystem is writable"
    # Values only the ConfigMap sets (the image's defaults differ).
    [[ $env == *MHA_LOG_FORMAT=json* && $env == *MHA_DRAIN_SECONDS=10* ]] \
        || fail "the ConfigMap's settings did not reach the server"
}

main() {
    mkdir -p "$WORK"
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=8192:8192"]\n' \
        "$(ulimit -Sn)" "$(ulimit -Hn)" > "$CONTAINERS_CONF"
    if [[ ${BUILD:-1} != 0 ]]; then
        IMAGE=mha-serve:cpu DOCKERFILE=deploy/Dockerfile build_image
        IMAGE=mha-models:latest DOCKERFILE=deploy/Dockerfile.models build_image
    fi
    render
    trap cleanup EXIT
    log "podman kube play (cpu overlay: ConfigMap + Deployment)"
    local since
    since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    "${PODMAN[@]}" kube play --replace "$PLAY" > /dev/null
    check_order "$since"
    log "inside the pod"
    check_pod
    check wait --target 127.0.0.1:8001 --timeout 120
    check infer --target 127.0.0.1:8001 --model mha
    local restarts
    restarts=$("${PODMAN[@]}" inspect --format '{{.RestartCount}}' "$SERVER")
    [[ $restarts == 0 ]] || fail "the server restarted $restarts times"
    log "kube smoke test passed"
}

main "$@"
