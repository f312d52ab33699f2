#!/usr/bin/env bash
# Build the CPU image with podman + runc, run it read-only as non-root with a model repository
# mounted, wait for readiness, send one inference and a health check, print what came back.
#
#   deploy/smoke.sh                 (from the repository root; `make smoke` runs it)
#
# Environment:
#   BASE=image      base image for deploy/Dockerfile (default: python:3.11-slim-bookworm if it
#                   is local or can be pulled, else a Debian bookworm base made with debootstrap)
#   IMAGE=tag       image to build and run (default mha-serve:cpu)
#   WORK=dir        cache for the debootstrap root and the exported models (/var/tmp/mha-smoke)
#   KEEP_IMAGE=1    keep the built image (it is kept by default; 0 removes it)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
IMAGE=${IMAGE:-mha-serve:cpu}
WORK=${WORK:-/var/tmp/mha-smoke}
PULL_BASE=docker.io/library/python:3.11-slim-bookworm
LOCAL_BASE=localhost/mha-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# crun fails in this kind of sandbox; runc works.
PODMAN=(podman --runtime runc)
# podman raises RLIMIT_NOFILE to 1048576 by default and, for a non-root user, RLIMIT_NPROC to
# the host's maximum; a sandbox without CAP_SYS_RESOURCE refuses both ("error setting rlimit
# type 7" / "type 6"). Keep the shell's open-file limits and ask for a modest process limit.
ULIMIT=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)")
RUN_ULIMIT=("${ULIMIT[@]}" --ulimit nproc=8192:8192)
# pip in the build trusts the host's CA bundle (a TLS-intercepting proxy's CA lives there).
CA_BUNDLE=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
NAME=mha-smoke-$$

log() { printf '\n== %s\n' "$*"; }

ensure_tools() {
    local missing=()
    for tool in podman runc debootstrap; do
        command -v "$tool" > /dev/null || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]} (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap > /dev/null
}

# A minimal bookworm with Python 3.11 and its venv module, imported as a podman image.
debootstrap_base() {
    local root=$WORK/rootfs
    if [[ ! -x $root/usr/bin/python3 ]]; then
        log "no base image can be pulled: building $LOCAL_BASE with debootstrap"
        rm -rf "$root"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$root" "$DEBIAN_MIRROR" > "$WORK/debootstrap.log"
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    fi
    tar -C "$root" -c . | "${PODMAN[@]}" import --change 'CMD ["python3"]' - "$LOCAL_BASE" > /dev/null
}

choose_base() {
    if [[ -n ${BASE:-} ]]; then
        return
    elif "${PODMAN[@]}" image exists "$PULL_BASE"; then
        BASE=$PULL_BASE
    elif "${PODMAN[@]}" image exists "$LOCAL_BASE"; then
        BASE=$LOCAL_BASE
    elif timeout 60 "${PODMAN[@]}" pull --quiet "$PULL_BASE" > /dev/null 2>&1; then
        BASE=$PULL_BASE
    else
        debootstrap_base
        BASE=$LOCAL_BASE
    fi
}

export_models() {
    if [[ ! -f $WORK/models/mha/1/model.onnx ]]; then
        log "exporting the default model on the host"
        "$VENV/bin/mha" export --repository "$WORK/models" --name mha
    fi
    # The container runs as uid 10001: it must be able to read, and never needs to write.
    chmod -R a+rX "$WORK/models"
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

main() {
    mkdir -p "$WORK"
    ensure_tools
    choose_base
    log "building $IMAGE from deploy/Dockerfile on BASE=$BASE"
    local ca=()
    [[ -f $CA_BUNDLE ]] && ca=(--volume "$CA_BUNDLE:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    "${PODMAN[@]}" build "${ULIMIT[@]}" "${ca[@]}" --file deploy/Dockerfile \
        --build-arg "BASE=$BASE" --tag "$IMAGE" . > "$WORK/build.log" 2>&1 \
        || { tail -n 30 "$WORK/build.log"; exit 1; }
    "${PODMAN[@]}" image inspect --format 'image {{.Id}} size {{.Size}} bytes user {{.Config.User}} entrypoint {{.Config.Entrypoint}}' "$IMAGE"
    echo "no torch in the image: $("${PODMAN[@]}" run --rm "${RUN_ULIMIT[@]}" --entrypoint python3 "$IMAGE" \
        -c 'import importlib.util as u; print(u.find_spec("torch") is None)')"
    export_models

    trap cleanup EXIT
    log "running $IMAGE read-only as uid 10001, models mounted read-only"
    "${PODMAN[@]}" run --detach --name "$NAME" "${RUN_ULIMIT[@]}" --read-only --tmpfs /tmp:rw,size=64m \
        --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
        --volume "$WORK/models:/models:ro" --publish 127.0.0.1::8001 "$IMAGE" > /dev/null
    local port
    port=$("${PODMAN[@]}" port "$NAME" 8001/tcp | sed 's/.*://')
    echo "container $NAME: uid $("${PODMAN[@]}" exec "$NAME" id -u), gRPC on 127.0.0.1:$port"

    log "waiting for readiness (grpc.health.v1)"
    "$VENV/bin/python" deploy/smoke_check.py wait --target "127.0.0.1:$port" --timeout 180

    log "one inference"
    if "$VENV/bin/python" -c 'import mha.service.cli_infer' 2> /dev/null; then
        "$VENV/bin/mha" infer --url "127.0.0.1:$port" --model mha --batch 2 --length 5
    else
        echo "(mha infer is not on this tree yet: a grpc + mha.service.codec request instead)"
        "$VENV/bin/python" deploy/smoke_check.py infer --target "127.0.0.1:$port" --model mha
    fi
    log "smoke test passed"
}

main "$@"
