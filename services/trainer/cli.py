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
    from rlhf.protocol import TRAINER_SERVICE
    from rlhf.server import run_service
    from rlhf.v1 import trainer_pb2_grpc
    from services.trainer.api.service import TrainerServicer

    setup_logging("trainer", server.log_level)
    servicer = TrainerServicer(config)
    run_service(
        "trainer",
        server,
        [(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, TRAINER_SERVICE)],
        load=lambda: None,  # nothing to load: models are loaded per run
    )
    return 0
