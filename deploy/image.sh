#!/usr/bin/env bash
# Build a serving image with podman + runc, on any base: the official slim Python image when it
# is local or can be pulled, else a Debian bookworm base made here with debootstrap.
#
#   deploy/image.sh                 (from anywhere; `make image` runs it)
#   BASE=python:3.11-slim-bookworm DOCKERFILE=deploy/Dockerfile.cuda IMAGE=mha-serve:cuda deploy/image.sh
#
# Environment:
#   BASE=image        base for the Dockerfile's BASE argument (default: see choose_base)
#   DOCKERFILE=path   deploy/Dockerfile (default) or deploy/Dockerfile.cuda
#   IMAGE=tag         the tag to build (default mha-serve:cpu)
#   WORK=dir          cache for the debootstrap root (default /var/tmp/mha-smoke)
#   LOCAL_BASE=tag    the debootstrap base's tag (default localhost/mha-base:bookworm)
# deploy/smoke.sh sources this file for the same settings and functions.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
IMAGE=${IMAGE:-mha-serve:cpu}
DOCKERFILE=${DOCKERFILE:-deploy/Dockerfile}
WORK=${WORK:-/var/tmp/mha-smoke}
PULL_BASE=docker.io/library/python:3.11-slim-bookworm
LOCAL_BASE=${LOCAL_BASE:-localhost/mha-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# crun fails in this kind of sandbox; runc works.
PODMAN=(podman --runtime runc)
# podman raises RLIMIT_NOFILE to 1048576 by default, which a sandbox without CAP_SYS_RESOURCE
# refuses ("error setting rlimit type 7"): keep the open-file limits this shell has.
ULIMIT=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)")
# pip in the build trusts the host's CA bundle (a TLS-intercepting proxy's CA lives there).
CA_BUNDLE=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}

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
    tar -C "$root" -c . | "${PODMAN[@]}" import --quiet --change 'CMD ["python3"]' - "$LOCAL_BASE" > /dev/null
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

build_image() {
    mkdir -p "$WORK"
    ensure_tools
    choose_base
    log "building $IMAGE from $DOCKERFILE on BASE=$BASE"
    local pip=() build_log=$WORK/build-${IMAGE//[^A-Za-z0-9.-]/_}.log
    [[ -f $CA_BUNDLE ]] && pip=(--volume "$CA_BUNDLE:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    # The host's pip index settings and local wheel folder reach the build too.
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
        [[ -n ${!var:-} ]] && pip+=(--build-arg "$var=${!var}")
    done
    [[ -d ${PIP_FIND_LINKS:-} ]] && pip+=(--volume "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" --build-arg "PIP_FIND_LINKS=$PIP_FIND_LINKS")
    "${PODMAN[@]}" build "${ULIMIT[@]}" "${pip[@]}" --file "$DOCKERFILE" \
        --build-arg "BASE=$BASE" --tag "$IMAGE" . > "$build_log" 2>&1 \
        || { tail -n 30 "$build_log"; exit 1; }
    "${PODMAN[@]}" image inspect --format 'image {{.Id}} size {{.Size}} bytes user {{.Config.User}} entrypoint {{.Config.Entrypoint}}' "$IMAGE"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    build_image
fi
