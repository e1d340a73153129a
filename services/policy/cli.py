"""`rlhf policy serve`: the policy service's flags and main.

Import-light on purpose (no torch here): `rlhf --help` builds every subcommand's parser.
"""

from __future__ import annotations

import argparse
import sys

from rlhf.config import add_env_argument, add_server_arguments, server_config

# rlhf.models.DEFAULT_POLICY, spelt out here because rlhf.models imports torch (a test checks
# that the two agree).
DEFAULT_POLICY = "smollm2-135m-instruct"


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the policy service's flags (each also settable as an RLHF_* env var)."""
    add_server_arguments(parser, default_port=50051)
    add_env_argument(
        parser,
        "--model",
        default=DEFAULT_POLICY,
        help="causal LM to serve: a Hugging Face folder or hub name "
        f"(default: {DEFAULT_POLICY}, the embedded offline SmolLM2-135M-Instruct)",
    )
    add_env_argument(parser, "--device", default="cpu", help="cpu, cuda or cuda:N")
    add_env_argument(parser, "--dtype", default="float32", help="float32, bfloat16 or float16")
    add_env_argument(
        parser,
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default, one per core); 1 avoids thread "
        "stalls on a CPU shared with other busy processes",
    )
    add_env_argument(
        parser,
        "--max-new-tokens-cap",
        type=int,
        default=512,
        help="largest max_new_tokens a Generate call may ask for",
    )
    add_env_argument(
        parser, "--max-batch-size", type=int, default=64, help="most prompts in one Generate call"
    )
    add_env_argument(
        parser,
        "--max-prompt-chars",
        type=int,
        default=32768,
        help="longest prompt, in characters, a Generate call may send",
    )


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM; exits non-zero, with the reason logged, if the model cannot load."""
    from rlhf.logs import setup_logging
    from rlhf.models import parse_device, parse_dtype
    from rlhf.server import run_service
    from services.policy.engine import EngineLimits, PolicyEngine
    from services.policy.server import PolicyServicer, servicers

    log = setup_logging("policy", args.log_level)
    try:
        device = parse_device(args.device)
        dtype = parse_dtype(args.dtype)
        for flag in ("max_new_tokens_cap", "max_batch_size", "max_prompt_chars"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
    except ValueError as err:
        log.error("bad configuration", extra={"reason": str(err)})
        print(f"rlhf policy serve: {err}", file=sys.stderr)
        return 2

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    limits = EngineLimits(
        max_new_tokens_cap=args.max_new_tokens_cap,
        max_batch_size=args.max_batch_size,
        max_prompt_chars=args.max_prompt_chars,
    )
    servicer = PolicyServicer()

    def load() -> None:
        try:
            # Built on the thread that will run it (rlhf.compute: one OpenMP team per process).
            engine = servicer.compute.run(
                PolicyEngine, args.model, device=device, dtype=dtype, limits=limits
            )
        except Exception as err:
            print(f"rlhf policy serve: cannot load model {args.model!r}: {err}", file=sys.stderr)
            raise
        servicer.attach(engine)

    run_service("policy", server_config(args), servicers(servicer), load)
    return 0
