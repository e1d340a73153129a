"""Shared fixtures: tiny models saved once per test session, the tiny policy engine and its
bounded policy service per module; one torch thread everywhere."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from tests.boundary import policy_server
from tools.tiny import make_causal_lm, make_classifier

# Tiny models run fastest on one thread, and on a shared 2-core machine torch's second OpenMP
# thread spin-waits on a descheduled sibling (a 1 s test took 34 s under load). Services the
# tests start as processes inherit OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs a command in this process (`main([...])`) routes the root logger to
    JSON on stderr (rlhf.logs.setup_logging); undone after it, so the next test's captured
    stderr holds only what that test's own code wrote."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("tiny-clf"))


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-logit sequence classifier, the shape of a trained reward model."""
    return make_classifier(tmp_path_factory.mktemp("tiny-rm"), labels=("LABEL_0",))


@pytest.fixture(scope="module")
def engine(tiny_lm: Path) -> PolicyEngine:
    """The tiny causal LM loaded once per module (a test that patches it restores it)."""
    return PolicyEngine(str(tiny_lm))


@pytest.fixture(scope="module")
def bounded_policy(engine: PolicyEngine) -> Iterator[tuple[PolicyServicer, grpc.Channel]]:
    """`engine` served with tests.boundary's upload limits, and a channel to it."""
    with policy_server(engine) as served:
        yield served
