"""The forward passes of PPO: rows of a PPOBatch through the policy (logits and values) or the
frozen reference (logits), at the response positions only, under the run's mixed precision."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from services.trainer.learner.batch import PPOBatch
from services.trainer.learner.value_head import (
    PolicyWithValueHead,
    base_model,
    causal_lm_logits,
)


def autocast(mixed_precision: str, device: torch.device) -> AbstractContextManager:
    """PPOConfig.mixed_precision as a context for forward passes: "bf16", torch.autocast in
    bfloat16 on the device's type; "no", nothing. Their outputs (logits, values) come out in
    float32 either way: the PPO math after them runs outside the context, in float32."""
    if mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


FLOAT32_ATTENTION = "sdpa_float32"
"""The attention implementation (transformers' AttentionInterface) `float32_attention` gives."""


def _sdpa_float32(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention on float32 copies of its inputs, outside autocast."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )


def float32_attention(lm: nn.Module | None, mixed_precision: str, device: torch.device) -> bool:
    """Under bf16 autocast on a CPU, makes a causal LM's (plain or peft) sdpa attention run in
    float32; True if it did.

    Why: torch's CPU flash attention backward is about 8x slower in bfloat16 than in float32 at
    PPO's shapes (measured with SmolLM2: 0.94 s against 0.12 s per step), while attention is a
    few percent of the FLOPs; the projections around it stay bf16. GPUs keep bf16 attention, the
    fast kernel there. Other attention implementations (eager, flash) are left as they are.
    """
    if lm is None or mixed_precision != "bf16" or device.type != "cpu":
        return False
    base = base_model(lm)
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(FLOAT32_ATTENTION, _sdpa_float32)
    base.set_attn_implementation(FLOAT32_ATTENTION)
    return True


def reference_linears_in_bf16(lm: nn.Module | None, mixed_precision: str) -> int:
    """Under bf16 autocast, stores a frozen reference LM's linear layers in bfloat16; returns how
    many.

    Autocast casts a linear layer's float32 weight to bfloat16 at every call (a frozen weight's
    cast is not even cached), so a weight stored in bfloat16 gives the same numbers bit for bit,
    in half the memory (212 MB of SmolLM2's reference) and without the cast. Left in float32:
    an LM head tied to the input embedding (the lookup is not autocast: it reads float32), norms
    and everything else autocast leaves alone, and any layer that trains.
    """
    if lm is None or mixed_precision != "bf16":
        return 0
    base = base_model(lm)
    embedding = base.get_input_embeddings().weight
    count = 0
    for module in base.modules():
        frozen = not any(p.requires_grad for p in module.parameters())
        if type(module) is nn.Linear and module.weight is not embedding and frozen:
            module.to(torch.bfloat16)
            count += 1
    return count


def batch_inputs(batch: PPOBatch, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows idx, trimmed to their longest sequence (right padding: trailing pads only)."""
    mask = batch.attention_mask[idx]
    length = int(mask.sum(1).max())
    return batch.input_ids[idx, :length], mask[:, :length]


def response_width(batch: PPOBatch, idx: torch.Tensor) -> int:
    """The longest response among rows idx: columns past it are padding in every one of them,
    so no logits, values or losses are computed there."""
    return int(batch.mask[idx].sum(1).max())


def response_positions(batch: PPOBatch, idx: torch.Tensor, length: int) -> torch.Tensor:
    """(b, w) positions whose outputs predict response tokens: query_len - 1 + t, for t below
    the rows' response_width w (a shorter row's padding columns repeat its last position)."""
    steps = torch.arange(response_width(batch, idx), device=batch.mask.device)
    return (batch.query_lens[idx, None] - 1 + steps[None, :]).clamp(max=length - 1)


def policy_forward(
    model: PolicyWithValueHead, batch: PPOBatch, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (b, w, V), values (b, w)) at the response positions of rows idx (w: their
    response_width)."""
    input_ids, attention_mask = batch_inputs(batch, idx)
    pos = response_positions(batch, idx, input_ids.shape[1])
    return model(input_ids, attention_mask, positions=pos)


def reference_forward(
    model: PolicyWithValueHead, ref_model: nn.Module | None, batch: PPOBatch, idx: torch.Tensor
) -> torch.Tensor:
    """The reference's logits (b, w, V) at the response positions of rows idx. ref_model None:
    the policy with its LoRA adapters switched off."""
    input_ids, attention_mask = batch_inputs(batch, idx)
    pos = response_positions(batch, idx, input_ids.shape[1])
    if ref_model is None:
        with model.reference():
            logits, _ = model(input_ids, attention_mask, positions=pos)
    elif isinstance(ref_model, PolicyWithValueHead):
        logits, _ = ref_model(input_ids, attention_mask, positions=pos)
    else:
        logits, _ = causal_lm_logits(ref_model, input_ids, attention_mask, pos)
    return logits
