"""`rlhf reward serve`: one reward backend behind the RewardService (rlhf.protocol).

The flags (and their RLHF_* variables) are generated from ServerConfig and RewardServiceConfig.
Import-light on purpose (no torch here): `rlhf --help` imports every service's cli module.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rlhf.config import add_dataclass_arguments, add_server_arguments, from_args, service_settings
from rlhf.defaults import REWARD_PORT
from services.reward.config import RewardServiceConfig, ignored_flags

__all__ = ["check_flags", "configure", "ignored_flags", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the reward service's flags to `parser`."""
    parser.description = "Serve a reward backend as rlhf.v1.RewardService."
    add_server_arguments(parser, default_port=REWARD_PORT)
    add_dataclass_arguments(parser, RewardServiceConfig)


def check_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the parsed flags before any model is read (the error text), or None."""
    try:
        from_args(RewardServiceConfig, args)
    except ValueError as err:
        return str(err)
    return None


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM; 0 after a graceful stop, 2 for bad flags, 1 if the backend fails
    to load (health never reports SERVING then)."""
    from rlhf.logs import setup_logging

    server, config = service_settings(args, RewardServiceConfig, "rlhf reward serve")
    log = setup_logging("reward", server.log_level)
    ignored = ignored_flags(config)
    if ignored:
        log.warning(
            "flags ignored by this backend",
            extra={"backend": config.backend, "ignored": ignored},
        )

    from rlhf.server import run_service
    from services.reward.backends import build_backend
    from services.reward.server import RewardServicer, ScoreSettings, servicers

    settings = ScoreSettings(
        name=config.name,
        input=config.input,
        max_batch_size=config.max_batch_size,
        max_samples=config.max_samples,
        max_text_chars=config.max_text_chars,
        max_total_chars=config.max_total_chars,
    )
    servicer = RewardServicer(settings)

    def load() -> None:
        log.info(
            "loading reward backend",
            extra={"backend": config.backend, "model": config.model, "device": config.device},
        )
        if config.backend == "hf-classifier":
            # Weight-loading progress bars would interleave with the JSON log lines on stderr.
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        try:
            backend = servicer.compute.run(build_backend, config)  # on the scoring thread
        except Exception as err:
            # One plain line that says what failed, before run_service logs the traceback.
            message = f"cannot load reward backend {config.backend}: {type(err).__name__}: {err}"
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

    run_service("reward", server, servicers(servicer), load)
    return 0
