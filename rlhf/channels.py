"""Client channels: TLS and a bearer token per ClientConfig, message limits for chunked
weights, no retries of their own.

A call fails at once with the peer's status (UNAVAILABLE when nothing listens), and every call
passes its own deadline (`timeout=`). Who retries decides that in one place: the trainer's loop
retries transient failures with backoff; a command-line client reports the failure and exits;
the launcher waits on health (wait_until_serving).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.auth import BearerToken, client_token
from rlhf.config.security import ClientConfig
from rlhf.server import GRPC_OPTIONS
from rlhf.tls import open_secure_channel

# Off altogether (not only unconfigured): no call is replayed behind its caller's back, and a
# weight stream is never buffered for a replay.
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.enable_retries", 0)]

ROUND_ROBIN_OPTION = (
    "grpc.service_config",
    json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}),
)
"""Channel option: gRPC's own client-side round_robin over every address of the target (each
call goes to the next READY address), instead of pick_first's one connection."""


def open_channel(
    address: str, client: ClientConfig | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to host:port (or a gRPC target such as dns:///host:port): TLS per
    `client.tls` (plaintext only where rlhf.tls allows it), presenting `client.token_file`'s
    token on every call, with large message limits, gRPC's retries off and `options` added
    (ROUND_ROBIN_OPTION). Raises TlsConfigError / AuthConfigError for files that cannot work."""
    client = client or ClientConfig()
    token = client_token(client.token_file) if client.token_file else None
    channel = open_secure_channel(address, client.tls, [*CHANNEL_OPTIONS, *options])
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


def check_health(channel: grpc.Channel, service: str = "", timeout_s: float = 2.0) -> str:
    """One grpc.health.v1 Check of `service` ("" = the whole server): the status's name
    (SERVING, NOT_SERVING, SERVICE_UNKNOWN, ...). A failed call raises grpc.RpcError."""
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_until_serving(channel: grpc.Channel, service: str = "", timeout_s: float = 60.0) -> None:
    """Blocks until the health service reports SERVING for `service`; raises TimeoutError."""
    import time

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            last = check_health(channel, service)
            if last == "SERVING":
                return
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        time.sleep(0.2)
    raise TimeoutError(f"service {service or '(server)'} not SERVING after {timeout_s}s: {last}")
