"""`rlhf reward serve`: one reward backend behind rlhf.v1.RewardService.

Import-light on purpose (no torch here): `rlhf --help` imports every service's cli module.
Every flag can also be set as an RLHF_* environment variable (see rlhf.config).
"""

from __future__ import annotations

import argparse
import logging
import sys

from rlhf.config import add_env_argument, add_server_arguments, server_config

DEFAULT_PORT = 50052
BACKEND_CHOICES = ("vader", "hf-classifier", "length", "keyword")
"""Kept in step with services.reward.backends.BACKENDS (imported lazily, not here)."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the reward service's flags to `parser`."""
    parser.description = "Serve a reward backend as rlhf.v1.RewardService."
    add_server_arguments(parser, default_port=DEFAULT_PORT)
    add_env_argument(
        parser,
        "--backend",
        default="vader",
        choices=BACKEND_CHOICES,
        help="vader (offline sentiment, default), hf-classifier (a sequence-classification "
        "model), length or keyword (explicit rule rewards)",
    )
    add_env_argument(
        parser,
        "--name",
        default="",
        help="RewardInfo.name, the source name in the trainer's statistics (default: backend)",
    )
    add_env_argument(
        parser,
        "--input",
        default="response",
        choices=("response", "prompt+response"),
        help="what is scored: the response alone, or prompt immediately followed by response "
        "(no separator, as the seed decoded them together)",
    )
    add_env_argument(
        parser,
        "--max-batch-size",
        type=int,
        default=32,
        help="samples per forward pass; larger requests are split",
    )
    add_env_argument(
        parser,
        "--max-samples",
        type=int,
        default=1024,
        help="samples accepted per Score call (RESOURCE_EXHAUSTED above)",
    )
    add_env_argument(
        parser,
        "--max-text-chars",
        type=int,
        default=20000,
        help="largest len(prompt) + len(response) in characters (INVALID_ARGUMENT above)",
    )
    hf = parser.add_argument_group("hf-classifier backend")
    add_env_argument(
        hf,  # type: ignore[arg-type]
        "--model",
        default="",
        help="AutoModelForSequenceClassification folder or hub name",
    )
    add_env_argument(
        hf,  # type: ignore[arg-type]
        "--label",
        default="",
        help="score this label's softmax probability (e.g. POSITIVE); required when the model "
        "has several labels, not needed for a single-logit reward model",
    )
    add_env_argument(
        hf,  # type: ignore[arg-type]
        "--logit",
        action="store_true",
        help="score the raw logit of --label instead of its probability",
    )
    add_env_argument(hf, "--device", default="cpu", help="cpu, cuda or cuda:N")  # type: ignore[arg-type]
    add_env_argument(
        hf,  # type: ignore[arg-type]
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default, one per core); 1 avoids thread "
        "stalls on a CPU shared with other busy processes",
    )
    add_env_argument(
        hf,  # type: ignore[arg-type]
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights' dtype on the device",
    )
    rules = parser.add_argument_group("length and keyword backends")
    add_env_argument(
        rules,  # type: ignore[arg-type]
        "--target-length",
        type=int,
        default=50,
        help="length backend: score = -|len - N| / N (0 at N, -1 when empty)",
    )
    add_env_argument(
        rules,  # type: ignore[arg-type]
        "--length-unit",
        default="words",
        choices=("words", "chars"),
        help="length backend: count whitespace-separated words or characters",
    )
    add_env_argument(
        rules,  # type: ignore[arg-type]
        "--keywords",
        default="",
        help="keyword backend: comma-separated words or phrases, matched case-insensitively as "
        "whole words",
    )
    add_env_argument(
        rules,  # type: ignore[arg-type]
        "--keyword-weight",
        type=float,
        default=1.0,
        help="keyword backend: score = weight x number of keyword occurrences",
    )


def check_flags(args: argparse.Namespace) -> str | None:
    """Flag combinations that are wrong before any model is read; the error text, or None.

    Checks that need the model's config (is --label one of its labels?) run in the backend.
    """
    backend = args.backend
    if backend not in BACKEND_CHOICES:
        return f"unknown reward backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}"
    if backend == "hf-classifier" and not args.model:
        return "--backend hf-classifier needs --model (a model folder or hub name)"
    if backend == "keyword" and not args.keywords.strip(", "):
        return "--backend keyword needs --keywords, e.g. --keywords 'good,great,thank you'"
    if backend == "length" and args.target_length < 1:
        return f"--target-length must be >= 1, got {args.target_length}"
    if args.threads < 0:
        return f"--threads must be >= 0, got {args.threads}"
    for flag in ("max_batch_size", "max_samples", "max_text_chars"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}"
    return None


def ignored_flags(args: argparse.Namespace) -> list[str]:
    """hf-classifier flags given to another backend. Warned about, not refused: an RLHF_MODEL
    meant for the policy service may share the environment."""
    if args.backend == "hf-classifier":
        return []
    given = [("--model", args.model), ("--label", args.label), ("--logit", args.logit)]
    return [flag for flag, value in given if value]


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM; 0 after a graceful stop, 2 for bad flags, 1 if the backend fails
    to load (health never reports SERVING then)."""
    from rlhf.logs import setup_logging

    log = setup_logging("reward", args.log_level)
    problem = check_flags(args)
    if problem:
        log.error("bad flags", extra={"reason": problem})
        print(f"rlhf reward serve: error: {problem}", file=sys.stderr, flush=True)
        return 2
    ignored = ignored_flags(args)
    if ignored:
        log.warning(
            "flags ignored by this backend",
            extra={"backend": args.backend, "ignored": ignored},
        )

    from rlhf.server import run_service
    from services.reward.backends import build_backend
    from services.reward.server import RewardServicer, ScoreSettings, servicers

    settings = ScoreSettings(
        name=args.name,
        input=args.input,
        max_batch_size=args.max_batch_size,
        max_samples=args.max_samples,
        max_text_chars=args.max_text_chars,
    )
    servicer = RewardServicer(settings)

    def load() -> None:
        log.info(
            "loading reward backend",
            extra={"backend": args.backend, "model": args.model, "device": args.device},
        )
        if args.backend == "hf-classifier":
            # Weight-loading progress bars would interleave with the JSON log lines on stderr.
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        try:
            backend = servicer.compute.run(build_backend, args)  # on the scoring thread
        except Exception as err:
            # One plain line that says what failed, before run_service logs the traceback.
            message = f"cannot load reward backend {args.backend}: {type(err).__name__}: {err}"
            print(f"rlhf reward serve: error: {message}", file=sys.stderr, flush=True)
            raise
        servicer.set_backend(backend)
        logging.getLogger("rlhf.reward").info(
            "reward backend ready",
            extra={
                "reward_name": settings.name or backend.name,
                "description": backend.description,
            },
        )

    run_service("reward", server_config(args), servicers(servicer), load)
    return 0
