"""vLLM's sampled log-probs against the trainer's recomputation of the same tokens with the same
weights (transformers, float32, in this process), on the tiny LM; test_smollm2 does the same at
real size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.clients import PolicyClient
from tests.policy.common import params
from tests.policy_vllm.common import assert_logprobs_close, trainer_logprobs, trainer_model

pytestmark = pytest.mark.slow

PROMPTS_8 = [
    "hello",
    "hello world",
    "the movie was very good",
    "why",
    "tell me about the robot and the poem",
    "i love it",
    "what is kl divergence ? explain it very short and simple",
    "a",
]
"""Batch 8, prompts of 1 to 11 tokens."""
CASES = {
    "seed-knobs": {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    "t0.7-top_p0.9-top_k20": {"temperature": 0.7, "top_k": 20, "top_p": 0.9},
}
"""The seed exercise's sampling, and the worker's temperature scaling under top-k/top-p."""
TINY_TOLERANCE = 1e-5
"""Max |vLLM - trainer| per token on the tiny LM. Measured: max 4.8e-7 (one float32 ulp at
|log p| ~ 4), mean 1.6e-7, in both cases. Two layers of width 64: only float32 rounding differs
(kernels, summation order). A real fault is orders above it: with the worker's temperature
scaling removed, the 0.7 case is off by up to 0.52; with a LoRA push loaded alone by vLLM's
own reload (no host copy), 0.44."""


@pytest.mark.parametrize("knobs", CASES.values(), ids=CASES.keys())
def test_logprobs_agree_with_the_trainers(
    client: PolicyClient,
    vllm_lm: Path,
    base_weights: dict[str, torch.Tensor],
    knobs: dict[str, float],
) -> None:
    client.update_weights(base_weights, client.info().weight_version + 1)  # known weights
    reply = client.generate(PROMPTS_8, params(max_new_tokens=64, seed=11, **knobs))
    completions = reply.completions
    assert all(len(c.response_logprobs) == len(c.response_token_ids) > 0 for c in completions)
    recomputed = trainer_logprobs(
        trainer_model(str(vllm_lm)),
        completions,
        knobs["temperature"],
        client.info().tokenizer.pad_token_id,
    )
    assert_logprobs_close(f"tiny LM {knobs}", completions, recomputed, TINY_TOLERANCE)
