"""UpdateWeights into the running vLLM engine, pushed as the trainer pushes them (PolicyClient):
a new version changes outputs (to exactly the transformers engine's on the same weights); a
LoRA step's partial push is served merged; a cut stream leaves the old weights serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.clients import PolicyClient
from services.policy.engine import PolicyEngine
from services.policy.server import params_from_proto
from services.trainer.learner.value_head import PolicyWithValueHead
from tests.policy.common import (
    GREEDY,
    PROMPTS,
    assert_cut_uploads_keep_the_old_weights,
    params,
    served_version,
    tokens,
    upload_chunks,
)
from tests.policy_vllm.common import logprob_gap, trainer_logprobs
from tests.policy_vllm.test_logprobs import PROMPTS_8, TINY_TOLERANCE

pytestmark = pytest.mark.slow

LORA_TARGETS = ("self_attn.q_proj.weight", "self_attn.v_proj.weight")
"""What a LoRA step with peft's default Llama targets (q_proj, v_proj) changes, and all the
trainer then pushes (policy_state_dict_for_serving(trained_only=True))."""


def test_update_changes_outputs_to_the_hf_engines(
    client: PolicyClient,
    other_engine: PolicyEngine,
    other_weights: dict[str, torch.Tensor],
    base_weights: dict[str, torch.Tensor],
) -> None:
    version = served_version(client)
    client.update_weights(base_weights, version + 1)
    before = client.generate(PROMPTS, GREEDY)
    assert before.weight_version == version + 1
    # Tied embeddings: the upload may carry lm_head.weight instead of model.embed_tokens.weight.
    upload = {k: v for k, v in other_weights.items() if k != "model.embed_tokens.weight"}
    reply = client.update_weights(upload, version + 2, chunk_bytes=64 * 1024)
    assert reply.version == version + 2 and reply.tensors_updated == len(upload)
    after = client.generate(PROMPTS, GREEDY)
    assert after.weight_version == version + 2 and client.info().weight_version == version + 2
    assert tokens(after) != tokens(before)
    # Greedy on the same weights: the very tokens of the transformers engine.
    expected = other_engine.generate(PROMPTS, params_from_proto(GREEDY))
    assert tokens(after) == [c.response_token_ids for c in expected]


def test_lora_step_push_is_served_merged(
    client: PolicyClient, other_lm: Path, other_weights: dict[str, torch.Tensor]
) -> None:
    """A LoRA step's push carries only the merged q_proj and v_proj; vLLM's model must serve
    them with every other tensor of the served version (its own reload fills a fused qkv layer
    only from all three): the trainer's LoRA policy recomputes the sampled log-probs."""
    version = served_version(client)
    client.update_weights(other_weights, version + 1)
    policy = PolicyWithValueHead.from_pretrained(str(other_lm), use_lora=True, seed=5).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained step: lora_B leaves zero (zero is the base model)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    partial = policy.policy_state_dict_for_serving(trained_only=True)
    assert sorted(partial) == sorted(k for k in other_weights if k.endswith(LORA_TARGETS))
    reply = client.update_weights(partial, version + 2)
    assert reply.version == version + 2 and reply.tensors_updated == len(partial)
    sampled = client.generate(PROMPTS_8, params(max_new_tokens=32, seed=3))
    assert sampled.weight_version == version + 2
    pad = client.info().tokenizer.pad_token_id
    worst, mean = logprob_gap(
        sampled.completions, trainer_logprobs(policy, sampled.completions, 1.0, pad)
    )
    report = f"after a LoRA step's push: |vLLM - trainer| max {worst:.3g}, mean {mean:.3g}"
    print(report)
    assert worst < TINY_TOLERANCE, report
    # ...and the push mattered: the version before it (the adapters off) gives other log-probs.
    with policy.reference():
        before = trainer_logprobs(policy, sampled.completions, 1.0, pad)
    stale, _ = logprob_gap(sampled.completions, before)
    assert stale > 100 * TINY_TOLERANCE, stale


def test_cut_streams_keep_the_old_weights(
    client: PolicyClient,
    base_weights: dict[str, torch.Tensor],
    other_weights: dict[str, torch.Tensor],
) -> None:
    # The cut uploads carry other weights than the served ones: applied, they would show.
    version = served_version(client) + 1
    client.update_weights(base_weights, version)
    chunks = upload_chunks(other_weights, version + 1)
    assert_cut_uploads_keep_the_old_weights(client, chunks, version)
