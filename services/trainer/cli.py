"""`rlhf trainer serve`: the trainer service's flags and main.

The flags (and their RLHF_* variables) are generated from ServerConfig, ClientConfig's
--token-file and TrainerServiceConfig. The trainer's channels to the policy and reward services
use its own --tls-cert/--tls-key/--tls-ca (a certificate from `rlhf certs` serves both roles)
and present --token-file's token when one is given.
Import-light (no torch here): the heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rlhf.command_errors import CommandError
from rlhf.config import add_dataclass_arguments, add_server_arguments, from_args, service_settings
from rlhf.config.security import ClientConfig
from rlhf.config.server import ServerConfig
from rlhf.defaults import TRAINER_PORT
from services.trainer.config import TrainerServiceConfig

if TYPE_CHECKING:
    from services.trainer.learner.parallel import DataParallel


# --- rlhf trainer serve ------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, default_port=TRAINER_PORT)
    # The TLS flags are the server's own (above): only the token is the client side's.
    add_dataclass_arguments(parser, ClientConfig, exclude={"tls"})
    add_dataclass_arguments(parser, TrainerServiceConfig)


def run(args: argparse.Namespace) -> int:
    server, config = service_settings(args, TrainerServiceConfig, "rlhf trainer serve")
    outbound = from_args(ClientConfig, args)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)  # before any torch work in this process

    from rlhf.auth import client_token
    from rlhf.logs import setup_logging
    from rlhf.server import run_service
    from services.trainer.api.service import TrainerServicer, servicers
    from services.trainer.orchestrator.transports import set_outbound

    setup_logging("trainer", server.log_level)
    if outbound.token_file:
        try:
            client_token(outbound.token_file)  # a bad file is said now, not at the first run
        except ValueError as err:
            raise CommandError(str(err)) from None
    set_outbound(outbound)
    dp = join_ranks(config)
    if dp is not None and not dp.leader:
        follow_rank_0(dp, server)
        return 0
    servicer = TrainerServicer(config)
    try:
        # Nothing to load at start: models are loaded per run.
        run_service("trainer", server, servicers(servicer), load=lambda: None)
    finally:
        if dp is not None:
            from services.trainer.orchestrator.learner_group import Followers

            # As in one process (whose exit waits for the run's thread), a run still going goes
            # on until it ends or the process is killed; it needs the other ranks until then.
            for run in list(servicer.runs.values()):
                if run.thread is not None:
                    run.thread.join()
            Followers(dp).shutdown()
    return 0


def join_ranks(config: TrainerServiceConfig) -> DataParallel | None:
    """Under torchrun (WORLD_SIZE > 1): this process's place among the learner's ranks."""
    from services.trainer.learner import parallel

    if parallel.world_from_env() <= 1:
        return None
    try:
        return parallel.init_from_env(config.data_parallel, config.dist_backend)
    except (RuntimeError, ValueError) as err:
        raise CommandError(f"cannot join the trainer's ranks: {err}") from None


def follow_rank_0(dp: DataParallel, server: ServerConfig) -> None:
    """A rank > 0: do rank 0's learner commands until it shuts down. The first rank of each
    node (LOCAL_RANK 0) serves gRPC health only on --host/--port, so the same probe works on
    every node's pod; the node's other ranks would find that port taken, and serve nothing."""
    import logging
    import os

    from rlhf.heap import tune_for_tensors
    from rlhf.server import build_server
    from services.trainer.orchestrator.learner_group import follow

    tune_for_tensors()  # as run_service does on rank 0

    first_on_node = os.environ.get("LOCAL_RANK", "0") == "0"
    health = build_server(f"trainer-rank-{dp.rank}", [], server) if first_on_node else None
    logging.getLogger("rlhf.trainer.ranks").info(
        "following rank 0", extra={"rank": dp.rank, "world": dp.world, "health": first_on_node}
    )
    try:
        follow(dp)
    finally:
        if health is not None:
            health.stop(grace_s=0)
