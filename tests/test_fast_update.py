"""The fast PPO update (issue #14): fused AdamW with the for-each path's statistics, old
checkpoints resuming into it, bf16 mixed precision, and the trainer's --threads."""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import pytest
import torch

from services.trainer.config import TrainerServiceConfig, load_train_config
from services.trainer.learner import ppo_trainer, value_head
from services.trainer.learner.config import PPOConfig
from services.trainer.learner.forward import FLOAT32_ATTENTION, PER_SEQUENCE_SUFFIX
from services.trainer.learner.optim import BUCKET_BYTES, StepInBackward, make_optimizer
from services.trainer.learner.ppo_trainer import PPOTrainer
from tests.test_ppo_step import make, rollouts

FIDELITY = {"rel": 1e-5, "abs": 1e-7}
"""Same statistics: 1e-5 relative, and an absolute floor for those near 0 (whitened means)."""


def foreach_adamw(trainer: PPOTrainer) -> None:
    """Gives the trainer the for-each AdamW the PPO step used before the fused one."""
    lr = trainer.config.learning_rate
    trainer.optimizer = torch.optim.AdamW(trainer.params, lr=lr, weight_decay=0.0, foreach=True)


def two_steps(trainer: PPOTrainer) -> list[dict[str, float]]:
    stats = [trainer.step(*rollouts(20)), trainer.step(*rollouts(21))]
    return [{k: v for k, v in s.items() if not k.startswith("time/")} for s in stats]


def test_fused_adamw_gives_the_foreach_steps_statistics(tiny_lm: Path) -> None:
    # At the seed's learning rate: make()'s 1e-3 moves the tiny model so far per step that
    # rounding differences grow past 1e-5 by the second step, whichever path is taken.
    lr = PPOConfig().learning_rate
    _, fused_model, fused = make(tiny_lm, learning_rate=lr)
    assert fused.optimizer.param_groups[0]["fused"] is True  # the CPU has the kernel
    _, foreach_model, foreach = make(tiny_lm, learning_rate=lr)
    foreach_adamw(foreach)

    fast, before = two_steps(fused), two_steps(foreach)
    for fast_stats, old_stats in zip(fast, before, strict=True):
        assert fast_stats.keys() == old_stats.keys()
        for name, value in old_stats.items():
            assert fast_stats[name] == pytest.approx(value, **FIDELITY), name
    assert fast[1]["objective/kl"] != 0.0  # the first step moved the policy: a real comparison
    for a, b in zip(fused_model.parameters(), foreach_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_foreach_checkpoint_resumes_into_the_fused_step(tiny_lm: Path) -> None:
    _, _, old = make(tiny_lm)
    foreach_adamw(old)
    old.step(*rollouts(22))
    buffer = io.BytesIO()
    torch.save(old.state_dict(), buffer)  # what a checkpoint from before the fused step holds
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["fused"] is None

    _, _, resumed = make(tiny_lm)
    resumed.load_state_dict(state)
    group = resumed.optimizer.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None  # still the fused step
    after = resumed.step(*rollouts(23))
    continued = old.step(*rollouts(23))
    for name in ("objective/kl", "ppo/loss/total", "ppo/val/vpred", "ppo/policy/ratio"):
        assert after[name] == pytest.approx(continued[name], **FIDELITY), name


def test_the_sparse_embedding_gradient_gives_the_dense_steps_numbers(
    tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny LM ties its embedding to the LM head, as SmolLM2 does: the case the sparse lookup
    # is for. Its small vocabulary repeats token ids, so rows are sums over several positions.
    # Bit for bit: each row is summed in the order the dense CPU backward sums it.
    _, sparse_model, sparse = make(tiny_lm)
    base = sparse_model.lm
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    with torch.enable_grad():
        assert "inputs_embeds" in value_head._token_inputs(base, torch.tensor([[1, 2]]))
    fast = two_steps(sparse)

    monkeypatch.setattr(value_head, "_token_inputs", lambda _base, ids: {"input_ids": ids})
    _, dense_model, dense = make(tiny_lm)
    assert fast == two_steps(dense)
    assert fast[1]["objective/kl"] != 0.0  # the first step moved the policy: a real comparison
    for a, b in zip(sparse_model.parameters(), dense_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bucket_bytes", [1, BUCKET_BYTES])  # each tensor; the whole tiny LM
def test_stepping_in_the_backward_pass_gives_the_same_numbers(
    tiny_lm: Path, bucket_bytes: int
) -> None:
    _, in_model, in_backward = make(tiny_lm, max_grad_norm=None)
    assert in_backward.step_in_backward is not None  # one process, no accumulation or clipping
    in_backward.step_in_backward = StepInBackward(in_backward.optimizer, bucket_bytes)
    _, after_model, after = make(tiny_lm, max_grad_norm=None)
    after.step_in_backward = None  # one step over all parameters after the backward pass

    live: list[int] = []  # gradients alive whenever one is complete (after the step hook)
    params = list(in_model.parameters())
    for param in params:
        param.register_post_accumulate_grad_hook(
            lambda _p: live.append(sum(p.grad is not None for p in params))
        )
    assert two_steps(in_backward) == two_steps(after)
    if bucket_bytes == 1:
        assert live and max(live) == 0  # each gradient was dropped at its own step
    assert all(p.grad is None for p in params)
    for a, b in zip(in_model.parameters(), after_model.parameters(), strict=True):
        assert torch.equal(a, b)
    a_state, b_state = in_backward.optimizer.state_dict(), after.optimizer.state_dict()
    assert a_state["state"].keys() == b_state["state"].keys()
    for index, slots in a_state["state"].items():
        for name, tensor in slots.items():
            assert torch.equal(tensor, b_state["state"][index][name]), (index, name)

    # A resumed trainer steps in the backward pass from the loaded state (a copy, as a
    # checkpoint's: load_state_dict would otherwise share the optimiser's tensors).
    buffer = io.BytesIO()
    torch.save(in_backward.state_dict(), buffer)
    buffer.seek(0)
    _, _, resumed = make(tiny_lm, max_grad_norm=None)
    resumed.step_in_backward = StepInBackward(resumed.optimizer, bucket_bytes)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    untimed = lambda stats: {k: v for k, v in stats.items() if not k.startswith("time/")}  # noqa: E731
    assert untimed(resumed.step(*rollouts(22))) == untimed(in_backward.step(*rollouts(22)))
    for a, b in zip(resumed.model.parameters(), in_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_bucket_with_a_parameter_left_without_gradient_steps_the_rest_at_the_end() -> None:
    def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.AdamW]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        return model, make_optimizer(model.parameters(), 1e-2)

    inputs = torch.randn(3, 4)
    model, optimizer = model_and_optimizer()
    in_backward = StepInBackward(optimizer)  # one bucket; the second layer gets no gradient
    with in_backward.stepping():
        model[0](inputs).square().sum().backward()
    reference, whole = model_and_optimizer()
    reference[0](inputs).square().sum().backward()
    whole.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b) and a.grad is None
    assert len(optimizer.state) == len(whole.state) == 2  # the first layer's weight and bias


@pytest.mark.parametrize("fields", [{}, {"max_grad_norm": None, "gradient_accumulation_steps": 2}])
def test_a_step_that_needs_every_gradient_first_steps_after_the_backward_pass(
    tiny_lm: Path, fields: dict[str, object]
) -> None:
    _, _, trainer = make(tiny_lm, **fields)  # clipping (the default 1.0), or accumulation
    assert trainer.step_in_backward is None


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_the_sparse_lookup_gradient_is_the_dense_ones_rows(padding_idx: int | None) -> None:
    table = torch.nn.Embedding(50, 8, padding_idx=padding_idx)
    ids = torch.randint(0, 6, (4, 30), generator=torch.Generator().manual_seed(0))  # repeats
    weights = torch.randn(4, 30, 8, generator=torch.Generator().manual_seed(1))
    (table(ids) * weights).sum().backward()
    dense = table.weight.grad
    table.weight.grad = None
    lookup = value_head._EmbeddingSparseGrad.apply(ids, table.weight, padding_idx)
    (lookup * weights).sum().backward()
    assert table.weight.grad.is_sparse
    assert torch.equal(table.weight.grad.to_dense(), dense)  # padding row: no gradient in both


def test_an_untied_or_frozen_embedding_keeps_the_dense_lookup(tiny_lm: Path) -> None:
    _, model, _ = make(tiny_lm)
    base, ids = model.lm, torch.tensor([[1, 2]])
    with torch.no_grad():  # the reference's and old policy's passes: no gradient to make
        assert value_head._token_inputs(base, ids) == {"input_ids": ids}
    base.get_input_embeddings().weight.requires_grad_(False)
    assert value_head._token_inputs(base, ids) == {"input_ids": ids}
    base.get_input_embeddings().weight.requires_grad_(True)
    base.get_output_embeddings().weight = torch.nn.Parameter(
        base.get_input_embeddings().weight.clone()
    )
    assert value_head._token_inputs(base, ids) == {"input_ids": ids}


# --- bf16 mixed precision -----------------------------------------------------------------------
def test_bf16_step_is_close_to_fp32_with_float32_weights(tiny_lm: Path) -> None:
    _, _, fp32 = make(tiny_lm)
    _, bf16_model, bf16 = make(tiny_lm, mixed_precision="bf16")
    expected, got = two_steps(fp32), two_steps(bf16)

    for name, value in got[1].items():
        assert math.isfinite(value), name
    for name in ("objective/kl", "objective/logprobs", "ppo/loss/value", "ppo/val/vpred"):
        assert got[1][name] == pytest.approx(expected[1][name], rel=5e-2, abs=5e-2), name
    assert got[1]["objective/logprobs"] != expected[1]["objective/logprobs"]  # bf16 did act

    assert {p.dtype for p in bf16_model.parameters()} == {torch.float32}
    slots = [s for state in bf16.optimizer.state.values() for s in state.values()]
    assert slots and {s.dtype for s in slots} == {torch.float32}
    batch = bf16.prepare(*rollouts(24))
    assert {batch.logprobs.dtype, batch.ref_logprobs.dtype, batch.values.dtype} == {torch.float32}


def test_a_bf16_reference_stores_its_linear_layers_in_bf16_with_the_same_numbers(
    tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, stored = make(tiny_lm, mixed_precision="bf16")
    dtypes = {n: p.dtype for n, p in stored.ref_model.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # tied to the LM head
    assert dtypes["model.norm.weight"] == torch.float32
    assert all(p.dtype == torch.float32 for p in stored.model.parameters())  # masters
    # On a CPU, attention under bf16 autocast runs in float32 (forward.float32_attention), per
    # packed sequence (forward.per_sequence_attention).
    for lm in (stored.model.lm, stored.ref_model):
        assert lm.config._attn_implementation == FLOAT32_ATTENTION + PER_SEQUENCE_SUFFIX
    _, _, fp32 = make(tiny_lm)
    assert fp32.model.lm.config._attn_implementation == "sdpa" + PER_SEQUENCE_SUFFIX
    monkeypatch.setattr(ppo_trainer, "reference_linears_in_bf16", lambda *_: 0)
    _, _, cast = make(tiny_lm, mixed_precision="bf16")  # autocast casts them at each call
    assert two_steps(stored) == two_steps(cast)


def test_bf16_with_lora_and_the_exact_kl(tiny_lm: Path) -> None:
    """configs/default.yaml trains LoRA adapters: its reference is the base with them off."""
    lora = {"use_lora": True, "lora_r": 4, "lora_alpha": 8, "kl_penalty": "full"}
    _, model, trainer = make(tiny_lm, mixed_precision="bf16", **lora)
    stats = two_steps(trainer)[1]
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["objective/kl"] > 0  # the exact KL of the moved adapters
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"mixed_precision": "fp16"}, "mixed_precision must be one of no, bf16; got 'fp16'"),
        (
            {"mixed_precision": "bf16", "dtype": "bfloat16"},
            "mixed_precision bf16 keeps float32 master weights: it needs dtype float32",
        ),
    ],
)
def test_mixed_precision_refusals(fields: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PPOConfig(**fields)  # type: ignore[arg-type]
    overrides = [f"ppo.{name}={value}" for name, value in fields.items()]
    with pytest.raises(ValueError, match=rf"ppo\.{fragment}"):
        load_train_config(None, overrides)  # a run config's error names the field


def test_mixed_precision_override() -> None:
    assert PPOConfig().mixed_precision == "no"
    assert load_train_config(None, ["ppo.mixed_precision=bf16"]).ppo.mixed_precision == "bf16"


# --- the trainer's --threads --------------------------------------------------------------------
def test_trainer_threads_flag_is_set_before_serving(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from rlhf import server
    from services.trainer import cli

    calls: list[tuple[str, object]] = []

    class Served(Exception):
        pass

    def serve(*_args: object, **_kwargs: object) -> None:
        calls.append(("serve", None))
        raise Served

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(server, "run_service", serve)
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["--threads", "3", "--port", "0", "--output-dir", str(tmp_path)])
    with pytest.raises(Served):
        cli.run(args)
    assert calls == [("threads", 3), ("serve", None)]

    with pytest.raises(ValueError, match="threads must be >= 0"):
        TrainerServiceConfig(threads=-1)
