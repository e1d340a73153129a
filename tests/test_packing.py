"""Packed sequences in the PPO forward passes (PPOConfig.pack_sequences): the same outputs and
statistics as right-padded rows, the packed layout itself, and the start-up check that refuses a
model whose attention would let packed sequences see each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.trainer.learner.config import PPOConfig
from services.trainer.learner.forward import (
    PER_SEQUENCE_SUFFIX,
    model_inputs,
    packing_problem,
    policy_forward,
    reference_forward,
)
from services.trainer.learner.ppo_trainer import PPOTrainer
from services.trainer.learner.value_head import PolicyWithValueHead
from tests.test_fast_update import two_steps
from tests.test_ppo_step import make, rollouts

PACKING_FIDELITY = {"rel": 1e-5, "abs": 1e-6}
"""Packed against padded statistics: 1e-5 relative, as the step's fidelity tests, with an
absolute floor for the KL statistics: differences of log-probs each rounded ~1e-7 apart by the
kernels' other shapes, summed over a response, where the KL itself is 1e-5 to 1e-3 (the
parameters are compared at 1e-5 relative too)."""
UNMASKED_ATTENTION = "test_sdpa_without_masks"
"""An attention implementation registered without a mask function: transformers then builds no
mask for it, and its sdpa attends causally across the whole row, packed sequences included."""


def unmasked_attention(lm: torch.nn.Module) -> None:
    """Switches a transformers LM to UNMASKED_ATTENTION."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(UNMASKED_ATTENTION, sdpa_attention_forward)
    lm.set_attn_implementation(UNMASKED_ATTENTION)


def prepared(tiny_lm: Path, **fields: object) -> tuple[PPOTrainer, object]:
    _, _, trainer = make(tiny_lm, **fields)
    return trainer, trainer.prepare(*rollouts(30))


def test_packed_inputs_hold_each_rows_tokens_and_point_at_its_response(tiny_lm: Path) -> None:
    trainer, batch = prepared(tiny_lm)
    idx = torch.tensor([2, 0, 3])
    x = model_inputs(batch, idx, packed=True)
    assert x.attention_mask is None and x.input_ids.shape[0] == 1
    queries = [batch.queries[i] for i in idx]
    responses = [batch.responses[i] for i in idx]
    expected = torch.cat([torch.cat([q, r]) for q, r in zip(queries, responses, strict=True)])
    assert torch.equal(x.input_ids[0], expected)  # the real tokens only, row after row
    starts = [0]
    for q, r in zip(queries, responses, strict=True):
        starts.append(starts[-1] + len(q) + len(r))
    restarts = torch.cat([torch.arange(b - a) for a, b in zip(starts, starts[1:], strict=False)])
    assert torch.equal(x.position_ids[0], restarts)
    width = max(len(r) for r in responses)
    assert x.positions.shape == (3, width)
    for row, r in enumerate(responses):
        # Each response token is predicted from the position before it, inside its own row.
        predicted = x.input_ids[0, x.positions[row, : len(r)] + 1]
        assert torch.equal(predicted, r)
        # Padding columns repeat the row's last token's position.
        assert (x.positions[row, len(r) :] == starts[row + 1] - 1).all()


def test_packed_forward_passes_give_the_padded_outputs(tiny_lm: Path) -> None:
    trainer, batch = prepared(tiny_lm)
    idx = torch.arange(4)
    with torch.no_grad():
        packed = policy_forward(trainer.model, batch, idx, packed=True)
        padded = policy_forward(trainer.model, batch, idx, packed=False)
        ref_packed = reference_forward(trainer.model, trainer.ref_model, batch, idx, True)
        ref_padded = reference_forward(trainer.model, trainer.ref_model, batch, idx, False)
    real = batch.mask.bool()  # columns past a response's end differ by design (ModelInputs)
    for got, want in zip((*packed, ref_packed), (*padded, ref_padded), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    # Rows of different lengths: padding did take part in the padded pass.
    assert len({len(q) + len(r) for q, r in zip(batch.queries, batch.responses, strict=True)}) > 1


@pytest.mark.parametrize(
    "fields",
    [{}, {"kl_penalty": "full"}, {"use_lora": True, "lora_r": 4, "lora_alpha": 8}],
    ids=["full-fine-tune", "exact-kl", "lora"],
)
def test_a_packed_step_gives_the_padded_steps_statistics(
    tiny_lm: Path, fields: dict[str, object]
) -> None:
    # At the seed's learning rate, as test_fast_update compares steps: make()'s 1e-3 moves the
    # tiny model so far that rounding differences grow past 1e-5 on any two paths.
    lr = PPOConfig().learning_rate
    _, packed_model, packed = make(tiny_lm, learning_rate=lr, **fields)
    _, padded_model, padded = make(tiny_lm, learning_rate=lr, pack_sequences=False, **fields)
    got, expected = two_steps(packed), two_steps(padded)
    for got_stats, want in zip(got, expected, strict=True):
        assert got_stats.keys() == want.keys()
        for name, value in want.items():
            assert got_stats[name] == pytest.approx(value, **PACKING_FIDELITY), name
    assert got[1]["objective/kl"] != 0.0  # the first step moved the policy
    for a, b in zip(packed_model.parameters(), padded_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_model_that_lets_packed_sequences_mix_is_refused(tiny_lm: Path) -> None:
    config = PPOConfig(model_name=str(tiny_lm), log_with=None)
    model = PolicyWithValueHead.from_config(config)
    assert packing_problem(model.lm, "no") is None
    unmasked_attention(model.lm)
    problem = packing_problem(model.lm, "no")
    assert problem is not None and "does not keep sequences packed into one row apart" in problem
    with pytest.raises(ValueError, match="pack_sequences: .*set pack_sequences false"):
        PPOTrainer(config, model)
    # Padded rows are safe with it (causal attention never reaches a row's trailing padding).
    PPOTrainer(PPOConfig(model_name=str(tiny_lm), log_with=None, pack_sequences=False), model)


def test_bf16_autocasts_float32_attention_keeps_packed_sequences_apart(tiny_lm: Path) -> None:
    """forward.float32_attention registers sdpa's mask function under its own name: without
    it transformers made no mask for that attention, and packed sequences mixed."""
    _, model, trainer = make(tiny_lm, mixed_precision="bf16")  # the start-up check passed
    for lm in (model.lm, trainer.ref_model):
        assert packing_problem(lm, "bf16") is None


def test_per_sequence_attention_is_the_block_diagonal_masks_attention() -> None:
    """What transformers' own packed path computes (a causal mask within each sequence over the
    whole row), sequence by sequence: the same numbers, without the cross-sequence products."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from services.trainer.learner import forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3  # 6 query heads on 2 key/value heads
    g = torch.Generator().manual_seed(0)
    lengths = [4, 1, 3]
    query = torch.randn(1, 6, sum(lengths), 8, generator=g)
    key, value = (torch.randn(1, 2, sum(lengths), 8, generator=g) for _ in range(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(sum(lengths), sum(lengths)).tril().bool()
    block = (causal & (sequence[:, None] == sequence[None, :]))[None, None]
    want, _ = sdpa_attention_forward(module, query, key, value, block, scaling=0.3)

    calls = []
    inner = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args[1].shape[2])  # the query's tokens
        return inner(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["test_counted_sdpa"] = counted
    try:
        attention = forward._attention_per_sequence("test_counted_sdpa")
        got, _ = attention(module, query, key, value, None, position_ids=position_ids, scaling=0.3)
    finally:
        del ALL_ATTENTION_FUNCTIONS["test_counted_sdpa"]
    assert calls == lengths  # each sequence on its own
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_trainers_models_attend_per_sequence_only_when_packing(tiny_lm: Path) -> None:
    _, _, packed = make(tiny_lm)
    _, _, padded = make(tiny_lm, pack_sequences=False)
    for lm in (packed.model.lm, packed.ref_model):
        assert lm.config._attn_implementation == "sdpa" + PER_SEQUENCE_SUFFIX
    for lm in (padded.model.lm, padded.ref_model):
        assert lm.config._attn_implementation == "sdpa"
