"""`rlhf policy serve`: the policy service's flags and main.

The flags (and their RLHF_* variables) are generated from ServerConfig and PolicyServiceConfig.
Import-light on purpose (no torch here): `rlhf --help` builds every subcommand's parser.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from rlhf.config import add_dataclass_arguments, add_server_arguments, service_settings
from rlhf.defaults import POLICY_PORT
from services.policy.config import PolicyServiceConfig


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the policy service's flags (each also settable as an RLHF_* env var)."""
    add_server_arguments(parser, default_port=POLICY_PORT)
    add_dataclass_arguments(parser, PolicyServiceConfig)


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM; exits non-zero, with the reason logged, if the model cannot load."""
    from rlhf.logs import setup_logging

    server, config = service_settings(args, PolicyServiceConfig, "rlhf policy serve")
    log = setup_logging("policy", server.log_level)

    from rlhf.models import parse_device
    from rlhf.server import run_service
    from services.policy.engine import EngineLimits, PolicyEngine
    from services.policy.server import PolicyServicer, servicers

    try:
        device = parse_device(config.device)  # does this machine have it?
    except ValueError as err:
        log.error("bad configuration", extra={"reason": str(err)})
        print(f"rlhf policy serve: {err}", file=sys.stderr)
        return 2

    engine_class: Callable[..., PolicyEngine] = PolicyEngine
    if config.engine == "vllm":
        from services.policy.vllm_engine import VllmPolicyEngine, import_vllm

        if config.threads:
            # vLLM binds its OpenMP threads to cores of its choosing unless told not to.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(config.threads))
        try:
            import_vllm()
        except RuntimeError as err:
            log.error("bad configuration", extra={"reason": str(err)})
            print(f"rlhf policy serve: {err}", file=sys.stderr)
            return 2
        engine_class = functools.partial(
            VllmPolicyEngine,
            kv_cache_gib=config.vllm_kv_cache_gib,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            tensor_parallel_size=config.vllm_tensor_parallel_size,
        )
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    limits = EngineLimits(
        max_new_tokens_cap=config.max_new_tokens_cap,
        max_batch_size=config.max_batch_size,
        max_prompt_chars=config.max_prompt_chars,
    )
    servicer = PolicyServicer(settings=config)

    def load() -> None:
        try:
            # Built on the thread that will run it (rlhf.compute: one OpenMP team per process).
            engine = servicer.compute.run(
                engine_class, config.model, device=device, dtype=config.dtype, limits=limits
            )
        except Exception as err:
            print(f"rlhf policy serve: cannot load model {config.model!r}: {err}", file=sys.stderr)
            raise
        servicer.attach(engine)

    run_service("policy", server, servicers(servicer), load)
    return 0
