"""`rlhf health`: one grpc.health.v1 Check, as an exit code (a container's HEALTHCHECK).

Exit 0 when the server (or the named service) reports SERVING, 1 otherwise, with one line that
says what it saw (a failure is a CommandError, which the `rlhf` entry point prints).
Kubernetes probes the same health service natively (`grpc:` probes); docker and docker-compose
have no gRPC probe, so the image's HEALTHCHECK runs this.
"""

from __future__ import annotations

import argparse
import os

from rlhf.command_errors import CommandError
from rlhf.config import add_env_argument


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


def run(args: argparse.Namespace) -> int:
    import grpc

    from rlhf.channels import check_health

    address = args.address
    if not address:
        port = os.environ.get("RLHF_PORT", "")
        if not port:
            raise CommandError("no --address and RLHF_PORT is not set")
        address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        try:
            status = check_health(channel, args.service, args.health_timeout_s)
        except grpc.RpcError as err:
            raise CommandError(f"{address}: {err.code().name}: {err.details()}") from err
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1
