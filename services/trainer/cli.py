"""`rlhf trainer serve`: the trainer service's flags and main.

The flags (and their RLHF_* variables) are generated from ServerConfig, ClientConfig's
--token-file and TrainerServiceConfig. The trainer's channels to the policy and reward services
use its own --tls-cert/--tls-key/--tls-ca (a certificate from `rlhf certs` serves both roles)
and present --token-file's token when one is given.
Import-light (no torch here): the heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse

from rlhf.command_errors import CommandError
from rlhf.config import add_dataclass_arguments, add_server_arguments, from_args, service_settings
from rlhf.config.security import ClientConfig
from rlhf.defaults import TRAINER_PORT
from services.trainer.config import TrainerServiceConfig


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
    servicer = TrainerServicer(config)
    # Nothing to load at start: models are loaded per run.
    run_service("trainer", server, servicers(servicer), load=lambda: None)
    return 0
