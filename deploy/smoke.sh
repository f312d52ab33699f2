#!/usr/bin/env bash
# Build the CPU image with podman + runc, run it read-only as non-root with a model repository
# mounted, wait for readiness, send one inference and a health check, print what came back.
#
#   deploy/smoke.sh                 (from the repository root; `make smoke` runs it)
#   BUILD=0 deploy/smoke.sh         (runs the image already built: .ci/run builds it once)
#
# Environment:
#   BASE, IMAGE, WORK   as for deploy/image.sh, which builds the image
#   MODELS=dir          model repository to serve; exported there when it has no model "mha"
#                       (default $WORK/models, kept between runs)
#   KEEP_IMAGE=1    keep the built image (it is kept by default; 0 removes it)
set -euo pipefail

# The build settings and functions (PODMAN, ULIMIT, log, build_image, ...).
# shellcheck source=deploy/image.sh
source "$(dirname "${BASH_SOURCE[0]}")/image.sh"
NAME=mha-smoke-$$
MODELS=${MODELS:-$WORK/models}
# For a non-root user podman also raises RLIMIT_NPROC to the host's maximum, refused the same
# way ("error setting rlimit type 6"): ask for a modest process limit instead.
RUN_ULIMIT=("${ULIMIT[@]}" --ulimit nproc=8192:8192)

export_models() {
    if [[ ! -f $MODELS/mha/1/model.onnx ]]; then
        log "exporting the default model on the host"
        "$VENV/bin/mha" export --repository "$MODELS" --name mha
    fi
    # The container runs as uid 10001: it must be able to read, and never needs to write.
    chmod -R a+rX "$MODELS"
}

cleanup() {
    if "${PODMAN[@]}" container exists "$NAME" 2> /dev/null; then
        log "server log (last lines)"
        "${PODMAN[@]}" logs "$NAME" 2>&1 | tail -n 15 || true
        "${PODMAN[@]}" rm --force --time 5 "$NAME" > /dev/null || true
    fi
    if [[ ${KEEP_IMAGE:-1} == 0 ]]; then
        "${PODMAN[@]}" rmi --force "$IMAGE" > /dev/null || true
    fi
}

fail() {
    echo "smoke FAILED: $*" >&2
    exit 1
}

main() {
    if [[ ${BUILD:-1} != 0 ]]; then
        build_image
    else
        "${PODMAN[@]}" image exists "$IMAGE" || fail "no image $IMAGE (BUILD=0 runs a built one)"
    fi
    local no_torch
    no_torch=$("${PODMAN[@]}" run --rm "${RUN_ULIMIT[@]}" --entrypoint python3 "$IMAGE" \
        -c 'import importlib.util as u; print(u.find_spec("torch") is None)')
    echo "no torch in the image: $no_torch"
    [[ $no_torch == True ]] || fail "torch is in the serving image"
    # The Deployment's preStop hook execs `sleep` from the image.
    "${PODMAN[@]}" run --rm "${RUN_ULIMIT[@]}" --entrypoint sleep "$IMAGE" 0 \
        || fail "no sleep in the image for the preStop hook"
    echo "preStop's sleep in the image: yes"
    export_models

    trap cleanup EXIT
    log "running $IMAGE read-only as uid 10001, models mounted read-only"
    "${PODMAN[@]}" run --detach --name "$NAME" "${RUN_ULIMIT[@]}" --read-only --tmpfs /tmp:rw,size=64m \
        --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
        --env MHA_DRAIN_SECONDS=2 --env MHA_GRACE_SECONDS=5 \
        --volume "$MODELS:/models:ro" --publish 127.0.0.1::8001 --publish 127.0.0.1::8002 \
        "$IMAGE" > /dev/null
    local port metrics_port uid
    port=$("${PODMAN[@]}" port "$NAME" 8001/tcp | sed 's/.*://')
    metrics_port=$("${PODMAN[@]}" port "$NAME" 8002/tcp | sed 's/.*://')
    uid=$("${PODMAN[@]}" exec "$NAME" id -u)
    echo "container $NAME: uid $uid, gRPC on 127.0.0.1:$port"
    [[ $uid == 10001 ]] || fail "the server runs as uid $uid"
    ! "${PODMAN[@]}" exec "$NAME" touch /probe 2> /dev/null || fail "the root filesystem is writable"

    log "waiting for readiness (grpc.health.v1)"
    "$VENV/bin/python" deploy/smoke_check.py wait --target "127.0.0.1:$port" --timeout 180

    log "one inference"
    if "$VENV/bin/python" -c 'import mha.client.cli' 2> /dev/null; then
        "$VENV/bin/mha" infer --url "127.0.0.1:$port" --model mha --batch 2 --length 5
    else
        echo "(mha infer is not on this tree yet: a grpc + mha.service.grpc.codec request instead)"
        "$VENV/bin/python" deploy/smoke_check.py infer --target "127.0.0.1:$port" --model mha
    fi
    log "metrics"
    "$VENV/bin/python" deploy/smoke_check.py metrics \
        --target "http://127.0.0.1:$metrics_port/metrics"

    log "SIGTERM: readiness goes NOT_SERVING at once, liveness stays up, then a clean exit"
    local start status
    start=$(date +%s.%N)
    "${PODMAN[@]}" kill --signal TERM "$NAME" > /dev/null
    "$VENV/bin/python" deploy/smoke_check.py draining --target "127.0.0.1:$port" --timeout 2
    status=$("${PODMAN[@]}" wait "$NAME")
    printf 'exit status %s after %.1f s (drain 2 s + grace 5 s at most)\n' "$status" \
        "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"
    [[ $status == 0 ]]
    log "smoke test passed"
}

main "$@"
