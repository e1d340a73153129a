"""The policy service on a real gRPC server on loopback, with a tiny random Llama.

One server serves the package's tests; tests that change weights read the served version first
and never assume another test's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhf.clients import PolicyClient
from rlhf.server import GrpcService, build_server
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer, servicers
from tests.policy.common import LIMITS
from tests.servers import open_config
from tools.tiny import make_causal_lm


@pytest.fixture(scope="package")
def engine(tiny_lm: Path) -> PolicyEngine:
    return PolicyEngine(str(tiny_lm), limits=LIMITS)


@pytest.fixture(scope="package")
def other_engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    """A second tiny LM (same shapes, other values), in-process: a "new version" and its output."""
    return PolicyEngine(str(make_causal_lm(tmp_path_factory.mktemp("tiny-lm-2"), seed=1)))


@pytest.fixture(scope="package")
def other_weights(other_engine: PolicyEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in other_engine.model.state_dict().items()}


@pytest.fixture(scope="package")
def service(engine: PolicyEngine) -> Iterator[GrpcService]:
    config = open_config(workers=4)
    svc = build_server("policy", servicers(PolicyServicer(engine)), config)
    yield svc
    svc.stop(grace_s=0)


@pytest.fixture(scope="package")
def client(service: GrpcService) -> Iterator[PolicyClient]:
    c = PolicyClient(f"127.0.0.1:{service.port}")
    yield c
    c.close()
