"""The policy service on the vLLM engine, as a process (`rlhf policy serve --engine vllm`, run
from .venv-vllm), on a tiny LM vLLM can serve; beside it, in this process, the transformers
engine (the reference) on the same weights.

One service serves the package's tests (it starts in ~25 s); tests that change weights read the
served version first and never assume another test's order. Where vLLM is not installed the
fixture raises engine_python's error: the tests fail, they are never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhf.clients import PolicyClient
from services.policy.engine import PolicyEngine
from tests.policy.common import LIMITS
from tests.policy_vllm.common import start_vllm_policy
from tools.launch import ServiceProcess
from tools.tiny import VLLM_SIZES, make_causal_lm


@pytest.fixture(scope="package")
def vllm_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LM with a head size vLLM's CPU attention takes."""
    return make_causal_lm(tmp_path_factory.mktemp("vllm-lm"), **VLLM_SIZES)


@pytest.fixture(scope="package")
def hf_engine(vllm_lm: Path) -> PolicyEngine:
    """The transformers engine on the same folder, in-process: what vLLM must agree with."""
    return PolicyEngine(str(vllm_lm), limits=LIMITS)


@pytest.fixture(scope="package")
def base_weights(hf_engine: PolicyEngine) -> dict[str, torch.Tensor]:
    """The weights the service starts with."""
    return {k: v.clone() for k, v in hf_engine.model.state_dict().items()}


@pytest.fixture(scope="package")
def other_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny LM (same shapes, other values): a "new version"."""
    return make_causal_lm(tmp_path_factory.mktemp("vllm-lm-2"), seed=1, **VLLM_SIZES)


@pytest.fixture(scope="package")
def other_engine(other_lm: Path) -> PolicyEngine:
    """The transformers engine on other_lm, in-process: the new version's output."""
    return PolicyEngine(str(other_lm), limits=LIMITS)


@pytest.fixture(scope="package")
def other_weights(other_engine: PolicyEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in other_engine.model.state_dict().items()}


@pytest.fixture(scope="package")
def vllm_service(
    vllm_lm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    service = start_vllm_policy("policy-vllm", str(vllm_lm), tmp_path_factory.mktemp("logs"))
    yield service
    assert service.stop() == 0, service.log_tail()


@pytest.fixture(scope="package")
def client(vllm_service: ServiceProcess) -> Iterator[PolicyClient]:
    c = PolicyClient(vllm_service.address)
    yield c
    c.close()
