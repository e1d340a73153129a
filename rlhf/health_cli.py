"""`rlhf health`: one grpc.health.v1 Check, as an exit code (a container's HEALTHCHECK).

Exit 0 when the server (or the named service) reports SERVING, 1 otherwise, with one line that
says what it saw (a failure is a CommandError, which the `rlhf` entry point prints).
Kubernetes' native `grpc:` probes and docker's HEALTHCHECK both need a command once the service
speaks TLS (native probes are plaintext only): this one, with the TLS flags, which read the same
RLHF_TLS_* variables the service in the container reads. Health is public (rlhf.auth), so any
certificate the CA signed will do; --tls-server-name names the certificate when the address is
not one of its names.
"""

from __future__ import annotations

import argparse
import os

from rlhf.command_errors import CommandError
from rlhf.config import add_dataclass_arguments, add_env_argument, from_args
from rlhf.config.security import ClientConfig
from rlhf.defaults import LOOPBACK


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Exit 0 if a gRPC server's health check reports SERVING, else 1."
    parser.add_argument(
        "--address",
        default="",
        help="host:port to check (default: 127.0.0.1:$RLHF_PORT, the port this container's "
        "service listens on)",
    )
    parser.add_argument(
        "--service",
        default="",
        help="service to check, e.g. rlhf.v1.PolicyService (default: the whole server)",
    )
    add_env_argument(
        parser, "--health-timeout-s", type=float, default=3.0, help="deadline of the check"
    )
    add_dataclass_arguments(parser, ClientConfig)


def run(args: argparse.Namespace) -> int:
    import grpc

    from rlhf.channels import check_health, open_channel

    address = args.address
    if not address:
        port = os.environ.get("RLHF_PORT", "")
        if not port:
            raise CommandError("no --address and RLHF_PORT is not set")
        address = f"{LOOPBACK}:{port}"
    try:
        channel = open_channel(address, from_args(ClientConfig, args))
    except ValueError as err:  # TLS or token files that cannot work, named with their flag
        raise CommandError(str(err)) from None
    with channel:
        try:
            status = check_health(channel, args.service, args.health_timeout_s)
        except grpc.RpcError as err:
            raise CommandError(f"{address}: {err.code().name}: {err.details()}") from err
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1
