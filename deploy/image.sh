#!/usr/bin/env bash
# Build a serving image with podman + runc, on any base: the official slim Python image when it
# is local or can be pulled, else a Debian bookworm base made here with mmdebstrap.
#
#   deploy/image.sh                 (from anywhere; `make image` runs it)
#   deploy/image.sh tools           install podman, runc and mmdebstrap when absent (apt-get)
#   deploy/image.sh digest          print the digest of the build inputs (the images' label)
#   BASE=python:3.11-slim-bookworm DOCKERFILE=deploy/Dockerfile.cuda IMAGE=mha-serve:cuda deploy/image.sh
#
# Environment:
#   BASE=image        base for the Dockerfile's BASE argument (default: see choose_base)
#   DOCKERFILE=path   deploy/Dockerfile (default), deploy/Dockerfile.cuda or deploy/Dockerfile.models
#   IMAGE=tag         the tag to build (default mha-serve:cpu)
#   WORK=dir          logs and the made base's tarball (default /var/tmp/mha-smoke)
#   LOCAL_BASE=tag    the made base's tag (default localhost/mha-base:bookworm)
# deploy/smoke.sh and deploy/kube_smoke.sh source this file for the same settings and functions.
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
# What the Dockerfiles copy from the build context; Python's caches are left out of both the
# build (deploy/containerignore) and the digest, so running the tree does not change either.
SOURCES=(pyproject.toml constraints.txt README.md service model export deploy/Dockerfile
    deploy/Dockerfile.cuda deploy/Dockerfile.models deploy/containerignore)
SOURCE_LABEL=io.mha-serve.source-digest

log() { printf '\n== %s\n' "$*"; }

ensure_tools() {
    local missing=()
    for tool in podman runc mmdebstrap; do
        command -v "$tool" > /dev/null || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) && return
    log "installing podman runc mmdebstrap (Debian packages; missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap \
        > "$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log"; exit 1; }
}

# sha256 (16 hex digits) of every build input's path and content: equal digests, same image.
source_digest() {
    find "${SOURCES[@]}" -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' \
        -not -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

# A minimal bookworm with Python 3.11 and its venv module, imported as a podman image. Only
# Debian's essential set plus Python: no apt, no init. libstdc++ is for numpy, ONNX Runtime and
# grpcio's extension modules. mmdebstrap installs with apt in one pass (debootstrap takes about
# three times as long); its scratch root lives in /dev/shm when there is one, since dpkg's
# writes, not the downloads, are most of its time on a disk.
made_base() {
    local tarball=$WORK/mha-base-bookworm.tar scratch=${TMPDIR:-/tmp}
    [[ -d /dev/shm && -w /dev/shm ]] && scratch=/dev/shm
    if [[ ! -s $tarball ]]; then
        log "no base image can be pulled: making $LOCAL_BASE with mmdebstrap"
        TMPDIR=$scratch mmdebstrap --variant=essential --mode=root --format=tar --dpkgopt=force-unsafe-io \
            --include=python3,python3-venv,ca-certificates,libstdc++6 \
            bookworm "$tarball.part" "$DEBIAN_MIRROR" > "$WORK/mmdebstrap.log" 2>&1 \
            || { tail -n 20 "$WORK/mmdebstrap.log"; rm -f "$tarball.part"; exit 1; }
        mv "$tarball.part" "$tarball"
    fi
    "${PODMAN[@]}" import --quiet --change 'CMD ["python3"]' "$tarball" "$LOCAL_BASE" > /dev/null
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
        made_base
        BASE=$LOCAL_BASE
    fi
}

# Dockerfile.models looks for torch's CPU wheels on download.pytorch.org. Where that host cannot
# be reached, pip would retry it five times for every package (minutes): leave it out (the
# caller's `pip` array gets the argument), and torch comes from PIP_FIND_LINKS or the index.
add_torch_index_arg() {
    [[ $DOCKERFILE == *Dockerfile.models && -z ${PIP_EXTRA_INDEX_URL:-} ]] || return 0
    if ! timeout 5 bash -c ': <> /dev/tcp/download.pytorch.org/443' 2> /dev/null; then
        echo "download.pytorch.org cannot be reached: the export stage uses the other indexes only"
        pip+=(--build-arg PIP_EXTRA_INDEX_URL=)
    fi
}

build_image() {
    mkdir -p "$WORK"
    ensure_tools
    choose_base
    log "building $IMAGE from $DOCKERFILE on BASE=$BASE"
    local pip=() build_log=$WORK/build-${IMAGE//[^A-Za-z0-9.-]/_}.log start=$SECONDS
    [[ -f $CA_BUNDLE ]] && pip=(--volume "$CA_BUNDLE:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    # The host's pip index settings and local wheel folder reach the build too.
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
        [[ -n ${!var:-} ]] && pip+=(--build-arg "$var=${!var}")
    done
    [[ -d ${PIP_FIND_LINKS:-} ]] && pip+=(--volume "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" --build-arg "PIP_FIND_LINKS=$PIP_FIND_LINKS")
    add_torch_index_arg
    "${PODMAN[@]}" build "${ULIMIT[@]}" "${pip[@]}" --file "$DOCKERFILE" \
        --ignorefile deploy/containerignore --label "$SOURCE_LABEL=$(source_digest)" \
        --build-arg "BASE=$BASE" --tag "$IMAGE" . > "$build_log" 2>&1 \
        || { tail -n 30 "$build_log"; exit 1; }
    "${PODMAN[@]}" image inspect --format "image {{.Id}} size {{.Size}} bytes user {{.Config.User}} entrypoint {{.Config.Entrypoint}} (built in $((SECONDS - start)) s)" "$IMAGE"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case ${1:-build} in
        build) build_image ;;
        tools) mkdir -p "$WORK" && ensure_tools ;;
        digest) source_digest ;;
        *) echo "usage: $0 [build|tools|digest]" >&2 && exit 2 ;;
    esac
fi
