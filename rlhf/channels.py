"""Client channels: message limits for chunked weights, and retries of UNAVAILABLE.

Retries are done by gRPC itself through the service config (transparent to the caller); every
call still passes its own deadline (`timeout=`), which bounds the retries too.
"""

from __future__ import annotations

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.server import GRPC_OPTIONS


def retry_service_config(max_attempts: int = 5) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{}],  # every method of every service
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.2s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def open_channel(address: str, max_attempts: int = 5) -> grpc.Channel:
    """An insecure channel to host:port with large message limits and UNAVAILABLE retries."""
    options = [
        *GRPC_OPTIONS,
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(max_attempts)),
        # Streams of weights are large; let a retry buffer hold a few chunks only.
        ("grpc.per_rpc_retry_buffer_size", 8 * 1024 * 1024),
    ]
    return grpc.insecure_channel(address, options=options)


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
