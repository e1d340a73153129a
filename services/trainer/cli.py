"""`rlhf trainer serve`: the trainer service's flags and main.

The flags (and their RLHF_* variables) are generated from ServerConfig and TrainerServiceConfig.
Import-light (no torch here): the heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import sys

from rlhf.config import add_dataclass_arguments, add_server_arguments, from_args, server_config
from rlhf.defaults import TRAINER_PORT
from services.trainer.config import TrainerServiceConfig


# --- rlhf trainer serve ------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, default_port=TRAINER_PORT)
    add_dataclass_arguments(parser, TrainerServiceConfig)


def run(args: argparse.Namespace) -> int:
    try:
        server = server_config(args)
        config = from_args(TrainerServiceConfig, args)
    except ValueError as err:
        print(f"rlhf trainer serve: {err}", file=sys.stderr)
        return 2

    from rlhf.logs import setup_logging
    from rlhf.server import run_service
    from services.trainer.api.service import TrainerServicer, servicers

    setup_logging("trainer", server.log_level)
    servicer = TrainerServicer(config)
    # Nothing to load at start: models are loaded per run.
    run_service("trainer", server, servicers(servicer), load=lambda: None)
    return 0
