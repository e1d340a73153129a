"""What the boundary tests (tests/test_status_codes.py, tests/test_limits.py) share: servers on
a free loopback port, raw calls through a generic channel method, a tiny policy, an idle
trainer and a recording reward backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from rlhf.server import GrpcService, build_server
from rlhf.v1 import policy_pb2
from rlhf.weights import encode_weights
from services.policy.config import PolicyServiceConfig
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from services.policy.server import servicers as policy_servicers
from services.reward.backends.base import RewardBackend
from services.trainer.api.runs import Run
from services.trainer.api.service import TrainerServicer
from services.trainer.config import TrainerServiceConfig
from tests.servers import open_config

Code = grpc.StatusCode


def server(name: str, registrations: list, **config: object) -> GrpcService:
    """A started server on a free loopback port with authorisation off (these tests are about
    what reaches the handlers; tests/test_service_security.py covers who may reach them)."""
    return build_server(name, registrations, open_config(**config))


def raw_call(
    channel: grpc.Channel, service, method: str, body: bytes, timeout: float = 5
) -> tuple[grpc.StatusCode, str]:
    """Calls `method` with a raw body through a generic method; returns (code, details)."""
    descriptor = service.methods_by_name[method]
    path = f"/{service.full_name}/{method}"
    kind = (descriptor.client_streaming, descriptor.server_streaming)
    try:
        if kind == (False, False):
            channel.unary_unary(path)(body, timeout=timeout)
        elif kind == (False, True):
            list(channel.unary_stream(path)(body, timeout=timeout))
        else:
            channel.stream_unary(path)(iter([body]), timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return Code.OK, ""


@contextmanager
def policy_server(engine: PolicyEngine) -> Iterator[tuple[PolicyServicer, grpc.Channel]]:
    """The tiny policy with a 0.5 s upload idle limit and at most 4 chunks per upload."""
    settings = PolicyServiceConfig(model="tiny", upload_idle_s=0.5, max_upload_chunks=4)
    servicer = PolicyServicer(engine, settings)
    service = server("policy", policy_servicers(servicer))
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield servicer, channel
    finally:
        channel.close()
        service.stop(grace_s=0)


def upload(engine: PolicyEngine, version: int, chunk_bytes: int) -> list[policy_pb2.WeightChunk]:
    """The engine's own weights as an upload of `version`."""
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    return list(encode_weights(weights, version, chunk_bytes=chunk_bytes))


class IdleTrainer(TrainerServicer):
    """A trainer whose run "r" stays STARTING forever: WatchRun streams on it stay idle."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(TrainerServiceConfig(output_dir=str(tmp)))
        self.runs["r"] = self.latest = Run("r", 5)


class RecordingBackend(RewardBackend):
    """Scores every text 0.5 and remembers it."""

    name = "recording"
    description = "0.5 for every text"

    def __init__(self) -> None:
        self.scored: list[str] = []

    def score(self, texts: list[str]) -> list[float]:
        self.scored.extend(texts)
        return [0.5] * len(texts)
