"""PPOTrainer and PolicyWithValueHead on the tiny random Llama (CPU, a second or two each)."""

from __future__ import annotations

import copy
import io
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from services.trainer.learner.config import PPOConfig
from services.trainer.learner.ppo_trainer import PPOTrainer
from services.trainer.learner.value_head import VALUE_HEAD_FILE, PolicyWithValueHead

STAT_NAMES = """
objective/kl objective/kl_coef objective/entropy objective/logprobs objective/ref_logprobs
ppo/mean_scores ppo/std_scores ppo/mean_non_score_reward ppo/loss/policy ppo/loss/value
ppo/loss/total ppo/policy/entropy ppo/policy/approxkl ppo/policy/policykl ppo/policy/clipfrac
ppo/policy/advantages_mean ppo/returns/mean ppo/returns/var ppo/val/vpred ppo/val/error
ppo/val/clipfrac ppo/val/mean ppo/val/var ppo/learning_rate ppo/kl env/reward_mean env/reward_std
time/ppo/forward_pass time/ppo/compute_rewards time/ppo/compute_advantages
time/ppo/optimize_step time/ppo/total
""".split()


def rollouts(seed: int, n: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Random queries/responses of different lengths (token ids past the specials) + scores."""
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(6, 60, (int(torch.randint(2, 6, (), generator=g)),), generator=g)]
    queries += [torch.randint(6, 60, (3 + i,), generator=g) for i in range(n - 1)]
    responses = [torch.randint(6, 60, (2 + (i * 3) % 5,), generator=g) for i in range(n)]
    scores = torch.randn(n, generator=g)
    return queries, responses, scores


def make(tiny_lm: Path, **overrides: object) -> tuple[PPOConfig, PolicyWithValueHead, PPOTrainer]:
    values = {"model_name": str(tiny_lm), "learning_rate": 1e-3, "log_with": None, **overrides}
    config = PPOConfig(**values)  # type: ignore[arg-type]
    model = PolicyWithValueHead.from_config(config)
    return config, model, PPOTrainer(config, model, model.tokenizer)


def test_step_lowers_the_ppo_loss_and_reports_every_stat(tiny_lm: Path) -> None:
    _, model, trainer = make(tiny_lm, value_head_dropout=0.0)
    batch = trainer.prepare(*rollouts(0))
    targets = trainer.targets(batch)
    before = trainer.evaluate_loss(batch, targets)
    stats = trainer.update(batch)
    after = trainer.evaluate_loss(batch, targets)
    assert after["ppo/loss/total"] < before["ppo/loss/total"] - 1e-3, (before, after)
    assert after["ppo/loss/value"] < before["ppo/loss/value"]

    missing = [name for name in STAT_NAMES if name not in stats]
    assert not missing, missing
    bad = {k: v for k, v in stats.items() if type(v) is not float or not math.isfinite(v)}
    assert not bad, bad
    assert stats["ppo/kl"] == stats["objective/kl"]
    assert stats["ppo/policy/skipped"] == 0.0 and stats["ppo/epochs"] == 4.0
    assert trainer.kl_ctl.value != stats["objective/kl_coef"]  # the controller moved
    # old log-probs in eval mode == a fresh forward with the same weights: ratio starts at 1
    assert abs(before["ppo/loss/policy"]) < 1e-5  # whitened advantages have mean 0


def test_ratio_guard_skips_an_exploding_batch(tiny_lm: Path) -> None:
    _, model, trainer = make(tiny_lm)
    batch = trainer.prepare(*rollouts(1))
    batch.logprobs = batch.logprobs - 5.0  # pi/pi_old = e^5 > ratio_threshold (10)
    params = [p.detach().clone() for p in model.parameters()]
    stats = trainer.update(batch)
    assert stats["ppo/policy/skipped"] == 1.0
    assert stats["ppo/loss/total"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert not trainer.optimizer.state  # never stepped


def test_early_stopping_on_policy_kl(tiny_lm: Path) -> None:
    _, _, trainer = make(tiny_lm, early_stopping=True, target_kl=0.1)
    batch = trainer.prepare(*rollouts(2))
    batch.logprobs = batch.logprobs + 1.0  # policykl = mean(old - new) ~ 1 > 1.5 * target_kl
    stats = trainer.update(batch)
    assert stats["ppo/epochs"] == 1.0 and stats["ppo/early_stop"] == 1.0


def test_full_kl_penalty_runs(tiny_lm: Path) -> None:
    _, _, trainer = make(tiny_lm, kl_penalty="full")
    first = trainer.step(*rollouts(3))
    second = trainer.step(*rollouts(4))
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert second["objective/kl"] > 0  # the exact KL is never negative


def test_lora_reference_training_serving_and_saving(tiny_lm: Path, tmp_path: Path) -> None:
    _, model, trainer = make(tiny_lm, use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("v_head.") for n in trainable)
    assert any(n.startswith("v_head.") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    trainer.step(*rollouts(5))
    with torch.no_grad():  # make the adapters' effect large enough to see
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    trainer.step(*rollouts(6))
    after = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)  # base weights never move

    model.eval()
    ids = torch.randint(6, 60, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        policy_logits, _ = model(ids, mask)
        with model.reference():
            ref_logits, _ = model(ids, mask)
    torch.testing.assert_close(ref_logits, base_logits, atol=1e-5, rtol=1e-5)
    assert (policy_logits - base_logits).abs().max() > 1e-3

    served = model.policy_state_dict_for_serving()
    merged = copy.deepcopy(model.lm).merge_and_unload().state_dict()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    tied = {"lm_head.weight"}  # the LM head is the input embedding: served once, by that name
    assert set(served) == set(base.state_dict()) - tied == set(merged) - tied
    for name, tensor in served.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the training model was not merged in place
        torch.testing.assert_close(model(ids, mask)[0], policy_logits)

    model.save_pretrained(tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    assert (tmp_path / "policy" / VALUE_HEAD_FILE).is_file()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits, policy_logits, atol=1e-5, rtol=1e-5
        )
    again = PolicyWithValueHead.from_pretrained(str(tmp_path / "policy"))
    torch.testing.assert_close(again.v_head.summary.weight, model.v_head.summary.weight)


def with_attention_dropout(tiny_lm: Path, folder: Path, dropout: float) -> Path:
    """A copy of the tiny LM whose config asks for attention dropout."""
    shutil.copytree(tiny_lm, folder)
    config = AutoConfig.from_pretrained(folder)
    config.attention_dropout = dropout
    config.save_pretrained(folder)
    return folder


def first_minibatch_stats(model_dir: Path, **overrides: object) -> dict[str, float]:
    """One epoch of one mini-batch (the whole batch): the step's ppo/* stats are that
    mini-batch's, and objective/* the old policy's."""
    sizes = {"batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1}
    _, _, trainer = make(model_dir, **sizes, **overrides)  # type: ignore[arg-type]
    stats = trainer.step(*rollouts(9))
    return {k: v for k, v in stats.items() if not k.startswith("time/")}


def test_ppo_epochs_run_in_eval_mode_as_trl(tiny_lm: Path, tmp_path: Path) -> None:
    """TRL 0.11.4 runs every forward pass in eval mode: a model with attention dropout 0.1 and
    the value head's dropout (default 0.1) gives the same first mini-batch as one without."""
    dropout = with_attention_dropout(tiny_lm, tmp_path / "dropout", 0.1)
    assert PPOConfig().value_head_dropout > 0 and not PPOConfig().dropout_in_update
    without = first_minibatch_stats(tiny_lm, value_head_dropout=0.0)
    assert first_minibatch_stats(dropout) == without
    assert without["ppo/policy/approxkl"] < 1e-10  # the same forward pass: the ratio starts at 1

    # With the knob, the epochs' forward passes run in train mode and dropout acts.
    trained = first_minibatch_stats(dropout, dropout_in_update=True)
    assert trained["objective/logprobs"] == without["objective/logprobs"]  # old: eval mode
    assert trained["ppo/policy/approxkl"] > 1e-6
    assert trained["ppo/val/vpred"] != pytest.approx(without["ppo/val/vpred"], rel=1e-5)


def test_state_dict_round_trip_is_bit_identical(tiny_lm: Path) -> None:
    batches = [rollouts(7), rollouts(8)]
    # Value-head dropout acting in the update: the restored RNG state matters.
    knobs = {"dropout_in_update": True}

    _, straight_model, straight = make(tiny_lm, **knobs)
    for batch in batches:
        straight.step(*batch)

    _, _, first = make(tiny_lm, **knobs)
    first.step(*batches[0])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    _, resumed_model, resumed = make(tiny_lm, **knobs)
    resumed.load_state_dict(state)
    resumed.step(*batches[1])

    pairs = zip(
        straight_model.state_dict().items(), resumed_model.state_dict().items(), strict=True
    )
    for (name_a, a), (name_b, b) in pairs:
        assert name_a == name_b and torch.equal(a, b), name_a
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    assert resumed.current_step == straight.current_step == 2


def test_the_state_a_checkpoint_writes_holds_the_live_weights_not_copies(tiny_lm: Path) -> None:
    # A copy would be a model's worth of memory at every checkpoint (the trainer's peak).
    _, model, trainer = make(tiny_lm)
    saved = trainer.state_dict()["model"]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == params.keys()
    for name, tensor in saved.items():
        assert tensor.data_ptr() == params[name].data_ptr(), name
        assert not tensor.requires_grad, name
