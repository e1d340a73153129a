"""The forward passes of PPO: rows of a PPOBatch through the policy (logits and values) or the
frozen reference (logits), at the response positions only, under the run's mixed precision."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

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
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_ATTENTION, _sdpa_float32)
    # sdpa's masks too: transformers builds none for an attention it has no mask function for,
    # which right-padded rows survive (causal attention never reaches their padding) but packed
    # sequences do not (forward.packing_problem found it).
    AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)
    base.set_attn_implementation(FLOAT32_ATTENTION)
    return True


PER_SEQUENCE_SUFFIX = "_per_sequence"
"""`per_sequence_attention` names the attention it gives <the model's attention> + this."""
PER_SEQUENCE_INNER = ("sdpa", FLOAT32_ATTENTION)
"""The attention implementations `per_sequence_attention` wraps."""


def _attention_per_sequence(inner_name: str) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function that runs `inner_name` (causal, unmasked) on each sequence of a
    packed row on its own; any other input goes to it as it is."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        inner = ALL_ATTENTION_FUNCTIONS[inner_name]
        position_ids = kwargs.get("position_ids")
        if query.shape[0] != 1 or attention_mask is not None or position_ids is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        # A sequence starts wherever the positions restart (model_inputs' packed layout).
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        if starts[:1] != [0] or len(starts) == 1:
            return inner(module, query, key, value, attention_mask, **kwargs)
        sizes = [b - a for a, b in zip(starts, [*starts[1:], query.shape[2]], strict=True)]
        parts = zip(*(t.split(sizes, dim=2) for t in (query, key, value)), strict=True)
        # Inner attention returns (batch, tokens, heads, head_dim): sequences join on tokens.
        outputs = [inner(module, q, k, v, None, **kwargs)[0] for q, k, v in parts]
        return torch.cat(outputs, dim=1), None

    return attention


def per_sequence_attention(lm: nn.Module) -> bool:
    """Makes a causal LM's (plain or peft) sdpa attention, or float32_attention's, attend
    within each sequence of a packed row by running it on each on its own; True if it did.

    Why: transformers separates packed sequences with a block-diagonal mask over the whole row,
    and sdpa then computes every pair of tokens in it: (sum of lengths)^2 where the sequences
    need sum(length^2), 4x the attention of four equal sequences. Per sequence, causal, packing
    costs no attention that padded rows would not. Unmasked, it also needs no mask function:
    transformers builds none for it, and a packed row's sequences are told apart by its
    position ids (which restart at 0 for each). Rows that are not packed get the inner
    attention without a mask, which right-padded rows survive (causal attention never reaches
    their padding); the trainer's forward passes give no other kind. Other attentions (eager,
    flash; flash separates packed sequences itself) are left as they are.
    """
    base = base_model(lm)
    config = getattr(base, "config", None)
    inner = getattr(config, "_attn_implementation", None)
    if inner not in PER_SEQUENCE_INNER:
        return False
    from transformers import AttentionInterface

    name = inner + PER_SEQUENCE_SUFFIX
    AttentionInterface.register(name, _attention_per_sequence(inner))
    base.set_attn_implementation(name)
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


PACKING_TOLERANCE = 0.05
"""packing_problem's bound on |packed - alone| over the largest |alone| logit. Float rounding
differs by ~1e-6 of it in float32 (~1e-2 in bfloat16); a model that lets packed sequences see
each other differs by O(1)."""


@torch.no_grad()
def packing_problem(lm: nn.Module, mixed_precision: str) -> str | None:
    """Why a causal LM (plain or peft) cannot run packed sequences, or None; run as the PPO
    forward passes run it (under `mixed_precision`'s autocast).

    Two short sequences packed into one row must give the logits each gives alone. transformers'
    models separate them by the position ids' restarts; one whose attention ignores those (an
    older or custom attention) would let the second sequence attend to the first."""
    base = base_model(lm)
    device = next(base.parameters()).device
    vocab = base.get_input_embeddings().num_embeddings
    first, second = torch.tensor([1, 2, 3]) % vocab, torch.tensor([4, 5]) % vocab
    ids = torch.cat([first, second])[None].to(device)
    position_ids = torch.tensor([[0, 1, 2, 0, 1]], device=device)
    positions = torch.tensor([[0, 1, 2], [3, 4, 4]], device=device)
    steps = torch.arange(len(first), device=device)
    training = lm.training
    lm.eval()
    try:
        with autocast(mixed_precision, device):
            packed, _ = causal_lm_logits(lm, ids, None, positions, position_ids)
            alone = [
                causal_lm_logits(lm, seq[None].to(device), None, steps[None, : len(seq)])
                for seq in (first, second)
            ]
    finally:
        lm.train(training)
    alone_logits = [logits[0] for logits, _ in alone]
    worst = max(
        float((packed[0] - alone_logits[0]).abs().max()),
        float((packed[1, :2] - alone_logits[1]).abs().max()),
    )
    scale = max(float(a.abs().max()) for a in alone_logits)
    if worst <= PACKING_TOLERANCE * scale:
        return None
    name = type(base).__name__
    return (
        f"{name} does not keep sequences packed into one row apart (their logits moved by "
        f"{worst:.3g}, the largest is {scale:.3g}): its attention ignores the position ids"
    )


@dataclass(frozen=True)
class ModelInputs:
    """What a forward pass over rows of a PPOBatch gives the model."""

    input_ids: torch.Tensor
    """(b, L) the rows right-padded to their longest; packed: (1, N), their N real tokens."""
    attention_mask: torch.Tensor | None
    """(b, L) 1 on real tokens; packed: None (the position ids separate the sequences)."""
    position_ids: torch.Tensor | None
    """Packed: (1, N) each token's position in its own sequence; else None (0.. per row)."""
    positions: torch.Tensor
    """(b, w) where in input_ids (its flattened tokens, when packed) the outputs predicting
    response tokens are: query_len - 1 + t for t below the rows' response_width w. A shorter
    response's columns past its end (masked everywhere) point at its row's padding, padded, or
    repeat its last token, packed (so the LM head runs once for them)."""


def model_inputs(batch: PPOBatch, idx: torch.Tensor, packed: bool) -> ModelInputs:
    """Rows idx as the model's inputs: right-padded to their longest sequence, or `packed`."""
    mask = batch.attention_mask[idx]
    lengths = mask.sum(1)
    steps = torch.arange(response_width(batch, idx), device=mask.device)
    last_response = batch.query_lens[idx, None] - 1 + steps[None, :]
    if not packed:
        length = int(lengths.max())
        positions = last_response.clamp(max=length - 1)
        return ModelInputs(batch.input_ids[idx, :length], mask[:, :length], None, positions)
    # Right padding: the real tokens lead each row, so the masked rows, flattened, are the
    # sequences end to end; each sequence's outputs start at its offset among them.
    real = mask.bool()
    offsets = (lengths.cumsum(0) - lengths)[:, None]
    positions = torch.minimum(offsets + last_response, offsets + lengths[:, None] - 1)
    position_ids = (mask.cumsum(1) - 1)[real][None]
    return ModelInputs(batch.input_ids[idx][real][None], None, position_ids, positions)


def response_width(batch: PPOBatch, idx: torch.Tensor) -> int:
    """The longest response among rows idx: columns past it are padding in every one of them,
    so no logits, values or losses are computed there."""
    return int(batch.mask[idx].sum(1).max())


def policy_forward(
    model: nn.Module, batch: PPOBatch, idx: torch.Tensor, packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (b, w, V), values (b, w)) at the response positions of rows idx (w: their
    response_width). `model`: a PolicyWithValueHead or its data-parallel wrapper."""
    x = model_inputs(batch, idx, packed)
    return model(x.input_ids, x.attention_mask, x.position_ids, positions=x.positions)


def reference_forward(
    model: PolicyWithValueHead,
    ref_model: nn.Module | None,
    batch: PPOBatch,
    idx: torch.Tensor,
    packed: bool,
) -> torch.Tensor:
    """The reference's logits (b, w, V) at the response positions of rows idx. ref_model None:
    the policy with its LoRA adapters switched off."""
    x = model_inputs(batch, idx, packed)
    args = (x.input_ids, x.attention_mask, x.position_ids)
    if ref_model is None:
        with model.reference():
            logits, _ = model(*args, positions=x.positions)
    elif isinstance(ref_model, PolicyWithValueHead):
        logits, _ = ref_model(*args, positions=x.positions)
    else:
        logits, _ = causal_lm_logits(ref_model, *args[:2], x.positions, x.position_ids)
    return logits
