"""`rlhf trainer serve`: the trainer service's flags and main.

Import-light (no torch here): the heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse

from rlhf.config import add_env_argument, add_server_arguments, server_config


# --- rlhf trainer serve ------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, default_port=50053)
    add_env_argument(
        parser, "--policy", default="127.0.0.1:50051", help="default PolicyService host:port"
    )
    add_env_argument(
        parser,
        "--reward",
        default="127.0.0.1:50052",
        help="default reward endpoints, comma-separated HOST:PORT[=WEIGHT]",
    )
    add_env_argument(parser, "--output-dir", default="runs", help="root of run folders")


def run(args: argparse.Namespace) -> int:
    from rlhf.logs import setup_logging
    from rlhf.server import run_service
    from rlhf.v1 import trainer_pb2_grpc
    from services.trainer.api.service import TrainerDefaults, TrainerServicer

    setup_logging("trainer", args.log_level)
    defaults = TrainerDefaults(
        policy=args.policy,
        rewards=[r for r in args.reward.split(",") if r],
        output_dir=args.output_dir,
    )
    servicer = TrainerServicer(defaults)
    run_service(
        "trainer",
        server_config(args),
        [
            (
                trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
                servicer,
                "rlhf.v1.TrainerService",
            )
        ],
        load=lambda: None,  # nothing to load: models are loaded per run
    )
    return 0
