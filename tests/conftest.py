"""Shared fixtures: tiny models saved once per test session; one torch thread everywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tools.tiny import make_causal_lm, make_classifier

# Tiny models run fastest on one thread, and on a shared 2-core machine torch's second OpenMP
# thread spin-waits on a descheduled sibling (a 1 s test took 34 s under load). Services the
# tests start as processes inherit OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
