"""Shared fixtures: tiny models saved once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import make_causal_lm, make_classifier


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
