"""A service that hangs as a SIGSTOPped process does, and a trainer on a loopback port, for the
stalled-peer tests (tests/test_stalled_peer.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlhf.defaults import LOOPBACK
from rlhf.intercept import HandlerInterceptor, rewrap
from rlhf.server import GrpcService, Registration
from rlhf.v1 import reward_pb2, reward_pb2_grpc, trainer_pb2_grpc
from services.trainer.api.client import TrainerClient
from services.trainer.api.service import TrainerServicer, Transports
from services.trainer.config import TrainerServiceConfig
from tests.servers import open_config

HEALTH_CHECK = f"/{health.SERVICE_NAME}/Check"


class Hang(HandlerInterceptor):
    """Holds every call its server gets while frozen, health checks included, as a SIGSTOPped
    process does (its kernel still takes the connections): each waits until thawed or until
    its caller gives up. Counts the health checks that reach the server."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.running.set()
        self.frozen_at = 0.0
        self.health_checks = 0

    def freeze(self) -> None:
        self.frozen_at = time.monotonic()
        self.running.clear()

    def thaw(self) -> None:
        self.running.set()

    def hold(self, context: grpc.ServicerContext) -> None:
        while not self.running.wait(0.05) and context.is_active():
            pass

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        def unary(behaviour):  # noqa: ANN001, ANN202
            def held(request, context):  # noqa: ANN001, ANN202
                if method == HEALTH_CHECK:
                    self.health_checks += 1
                self.hold(context)
                return behaviour(request, context)

            return held

        return rewrap(handler, unary, lambda behaviour: behaviour)


class Reward(reward_pb2_grpc.RewardServiceServicer):
    """Scores 0.5 per sample. Score call number `freeze_at` (1-based) hangs the whole service
    (Hang.freeze) and waits with it; with `slow_s` each Score takes that long (health answers)."""

    def __init__(self, hang: Hang) -> None:
        self.hang = hang
        self.freeze_at = 0
        self.slow_s = 0.0
        self.calls = 0

    def GetInfo(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC method
        return reward_pb2.RewardInfo(name="frozen")

    def Score(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC method
        self.calls += 1
        if self.calls == self.freeze_at:
            self.hang.freeze()
            self.hang.hold(context)
        elif self.slow_s:
            time.sleep(self.slow_s)  # the service's own slow work, not the test's timing
        return reward_pb2.ScoreResponse(scores=[0.5] * len(request.samples))


@contextmanager
def hanging_server(registrations: list[Registration], hang: Hang) -> Iterator[str]:
    """The servicers and grpc.health.v1 (SERVING) on a loopback port 0 behind `hang`: a plain
    grpc.server, because rlhf.server's GrpcService takes no extra interceptor. Yields the
    address; thaws before it stops."""
    server = grpc.server(ThreadPoolExecutor(max_workers=32), interceptors=[hang])
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for add_fn, servicer, full_name in registrations:
        add_fn(servicer, server)
        health_servicer.set(full_name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    try:
        yield f"{LOOPBACK}:{port}"
    finally:
        hang.thaw()
        server.stop(0)


@contextmanager
def trainer_for(
    settings: TrainerServiceConfig, transports: Transports
) -> Iterator[tuple[TrainerClient, TrainerServicer]]:
    """A trainer service with `transports` on a loopback port 0, and a client to it; its runs'
    threads are joined before it stops."""
    servicer = TrainerServicer(settings, transports)
    service = GrpcService("trainer", open_config(grace_s=0))
    service.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, "trainer")
    port = service.start()
    service.set_serving()
    client = TrainerClient(f"{LOOPBACK}:{port}")
    try:
        yield client, servicer
    finally:
        client.close()
        for run in servicer.runs.values():  # no run thread outlives its test
            if run.thread is not None:
                run.thread.join(60)
        service.stop(grace_s=0)
