"""PPOTrainer: TRL 0.11's PPOTrainer.step, in plain PyTorch, split into phases the loop can time.

    batch = trainer.prepare(queries, responses, scores)  # old logprobs, values, ref logprobs
    stats = trainer.update(batch)                         # rewards, GAE, PPO epochs, KL control
    stats = trainer.step(queries, responses, scores)      # both

The rollouts' layout is in `batch`, the forward passes in `forward`, the stats in `stats`
(classic TRL names, as plain floats). Every forward pass runs in eval mode, as in TRL 0.11.4
(its batched_forward_pass calls model.eval(); the model.train() in train_minibatch comes after
the mini-batch's forward pass), unless PPOConfig.dropout_in_update asks for train mode in the
PPO epochs. With PPOConfig.mixed_precision "bf16" the forward passes run under bfloat16 autocast
(`forward.autocast`); everything after the logits and values, in float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

# ppo.py imports trl's helpers on first use, and that import draws once from python's global
# RNG (rich, which trl imports, seeds its style ids with random.getrandbits). Imported here,
# before any set_seed, the draw can no longer land inside a process's first run only, where it
# made a resumed run's RNG state differ from an uninterrupted one's (found by tools/chaos.py).
import trl.trainer.utils  # noqa: F401
from torch import nn

from services.trainer.learner.batch import (
    PPOBatch,
    PPOTargets,
    Scores,
    as_token_rows,
    pad_rollouts,
    scores_tensor,
)
from services.trainer.learner.config import PPOConfig
from services.trainer.learner.forward import (
    autocast,
    float32_attention,
    packing_problem,
    per_sequence_attention,
    policy_forward,
    reference_forward,
    reference_linears_in_bf16,
    response_width,
)
from services.trainer.learner.kl_control import make_kl_controller
from services.trainer.learner.optim import StepInBackward, load_optimizer_state, make_optimizer
from services.trainer.learner.parallel import (
    DataParallel,
    full,
    gather_rows,
    like,
    local,
    with_own_rows,
    wrap,
)
from services.trainer.learner.ppo import (
    compute_advantages,
    compute_rewards,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    ppo_loss,
)
from services.trainer.learner.seeding import rng_state, set_rng_state, set_seed
from services.trainer.learner.stats import record_step_stats
from services.trainer.learner.value_head import PolicyWithValueHead

log = logging.getLogger("rlhf.trainer.ppo")


class PPOTrainer:
    """PPO on a PolicyWithValueHead against a frozen reference (TRL 0.11 semantics).

    ref_model: a frozen causal LM (e.g. `model.create_reference()`) or PolicyWithValueHead;
    None: LoRA models use their base weights (`model.reference()`), others get
    `model.create_reference()` now.
    parallel: this rank's data-parallel group (learner/parallel.py says how a step is split);
    None: one process does it all.
    """

    def __init__(
        self,
        config: PPOConfig,
        model: PolicyWithValueHead,
        tokenizer: Any = None,
        ref_model: nn.Module | None = None,
        parallel: DataParallel | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if ref_model is None and not model.is_peft:
            ref_model = model.create_reference()  # whole, before FSDP shards the model
        self.ref_model = ref_model
        ref_lm = ref_model.lm if isinstance(ref_model, PolicyWithValueHead) else ref_model
        lms = [lm for lm in (model.lm, ref_lm) if lm is not None]
        for lm in lms:
            float32_attention(lm, config.mixed_precision, model.device)
        if ref_model is not None and not isinstance(ref_model, PolicyWithValueHead):
            reference_linears_in_bf16(ref_model, config.mixed_precision)
        if config.pack_sequences:
            for lm in lms:
                per_sequence_attention(lm)
                problem = packing_problem(lm, config.mixed_precision)
                if problem:
                    raise ValueError(
                        f"pack_sequences: {problem}; set pack_sequences false to pad instead"
                    )
        self.parallel = parallel
        self.train_model: nn.Module = model
        """What the PPO epochs call: the model, or its DDP wrapper (FSDP shards it in place)."""
        if parallel is not None:
            problems = parallel.batch_problems(config.batch_size, config.mini_batch_size)
            if problems:
                raise ValueError("; ".join(problems))
            self.train_model = wrap(model, parallel)
        set_seed(config.seed)
        # Mini-batch shuffling; seeded alike on every rank, so all ranks draw the same order.
        self.generator = torch.Generator().manual_seed(config.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # AdamW without weight decay is TRL's Adam; fused where the device has the kernel.
        self.optimizer = make_optimizer(self.params, config.learning_rate)
        # The parameters step in the backward pass where no step needs all gradients first:
        # one process, one mini-batch per step, no clipping (the seed's settings). Same numbers,
        # a model's worth of gradients less memory (optim.StepInBackward).
        alone = parallel is None and config.gradient_accumulation_steps == 1
        self.step_in_backward = (
            StepInBackward(self.optimizer) if alone and config.max_grad_norm is None else None
        )
        self.kl_ctl = make_kl_controller(
            config.adap_kl_ctrl, config.init_kl_coef, config.target, config.horizon
        )
        self.current_step = 0
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    # --- phase 1: the old policy's log-probs, values, and the reference's log-probs ------------
    @torch.no_grad()
    def prepare(
        self,
        queries: Sequence[torch.Tensor],
        responses: Sequence[torch.Tensor],
        scores: Scores | None = None,
    ) -> PPOBatch:
        """Forward passes of policy (eval mode, no dropout) and reference over the batch."""
        t0 = time.perf_counter()
        size = self.config.batch_size
        query_rows = as_token_rows(queries, "queries", size, self.device)
        response_rows = as_token_rows(responses, "responses", size, self.device)
        if any(len(q) == 0 for q in query_rows):
            raise ValueError("every query needs at least one token")
        if any(len(r) == 0 for r in response_rows):
            raise ValueError("every response needs at least one token")
        score_tensor = self._scores(scores) if scores is not None else None
        batch = pad_rollouts(
            query_rows, response_rows, self.pad_token_id, self._full_kl, score_tensor
        )
        self._old_policy_numbers(batch)
        batch.timing["time/ppo/forward_pass"] = time.perf_counter() - t0
        return batch

    def _old_policy_numbers(self, batch: PPOBatch) -> None:
        """Fills batch.logprobs, ref_logprobs, values (and full_kl) in eval mode; with data
        parallelism, this rank's share of the rows, then every rank's, gathered."""
        self.model.eval()
        bsz, step = batch.input_ids.shape[0], self.config.mini_batch_size
        rows = self.parallel.share(bsz) if self.parallel else slice(0, bsz)
        # In chunks of mini_batch_size, as TRL's batched_forward_pass, to bound memory.
        for start in range(rows.start, rows.stop, step):
            idx = torch.arange(start, min(start + step, rows.stop), device=self.device)
            with self._autocast():
                packed = self.config.pack_sequences
                logits, values = policy_forward(self.model, batch, idx, packed)
                ref_logits = reference_forward(self.model, self.ref_model, batch, idx, packed)
            # Columns past these rows' longest response stay 0: padding, masked everywhere.
            cols = slice(0, logits.shape[1])
            labels = batch.response_ids[idx, cols]
            batch.logprobs[idx, cols] = logprobs_from_logits(logits, labels)
            batch.ref_logprobs[idx, cols] = logprobs_from_logits(ref_logits, labels)
            batch.values[idx, cols] = values
            if batch.full_kl is not None:
                exact = kl_penalty(
                    "full",
                    logprobs_from_logits(logits, None),
                    logprobs_from_logits(ref_logits, None),
                )
                batch.full_kl[idx, cols] = exact
        if self.parallel is not None:
            width = batch.mask.shape[1]
            batch.logprobs = gather_rows(batch.logprobs[rows], self.parallel, width)
            batch.ref_logprobs = gather_rows(batch.ref_logprobs[rows], self.parallel, width)
            batch.values = gather_rows(batch.values[rows], self.parallel, width)
            if batch.full_kl is not None:
                batch.full_kl = gather_rows(batch.full_kl[rows], self.parallel, width)

    # --- phase 2: rewards, advantages, PPO epochs, KL control --------------------------------
    def targets(self, batch: PPOBatch, scores: Scores | None = None) -> PPOTargets:
        """TRL's compute_rewards + compute_advantages at the current KL coefficient."""
        cfg = self.config
        score_tensor = self._scores(scores) if scores is not None else batch.scores
        if score_tensor is None:
            raise ValueError("no scores: pass them to prepare() or update()")
        if cfg.score_clip is not None:
            score_tensor = score_tensor.clamp(-cfg.score_clip, cfg.score_clip)
        with torch.no_grad():
            t = time.perf_counter()
            kl_coef = float(self.kl_ctl.value)
            if batch.full_kl is not None:
                # The exact KL is already per token: "kl" mode of (full_kl - 0) passes it through.
                rewards, non_score, kls = compute_rewards(
                    score_tensor,
                    batch.full_kl,
                    torch.zeros_like(batch.full_kl),
                    batch.mask,
                    kl_coef,
                )
            else:
                rewards, non_score, kls = compute_rewards(
                    score_tensor,
                    batch.logprobs,
                    batch.ref_logprobs,
                    batch.mask,
                    kl_coef,
                    cfg.kl_penalty,
                )
            t_rewards = time.perf_counter() - t
            t = time.perf_counter()
            values, advantages, returns = compute_advantages(
                batch.values, rewards, batch.mask, cfg.gamma, cfg.lam, cfg.whiten_rewards
            )
            t_adv = time.perf_counter() - t
        return PPOTargets(
            scores=score_tensor,
            rewards=rewards,
            non_score_reward=non_score,
            kls=kls,
            values=values,
            advantages=advantages,
            returns=returns,
            kl_coef=kl_coef,
            timing={"time/ppo/compute_rewards": t_rewards, "time/ppo/compute_advantages": t_adv},
        )

    def update(self, batch: PPOBatch, scores: Scores | None = None) -> dict[str, float]:
        """ppo_epochs over shuffled mini-batches, then the KL controller; returns the stats."""
        cfg = self.config
        t0 = time.perf_counter()
        targets = self.targets(batch, scores)

        t = time.perf_counter()
        # Eval mode by default, as TRL 0.11.4: every forward pass of its PPO epochs follows a
        # model.eval() (batched_forward_pass), so no dropout acts on the policy or value head.
        self.model.train(cfg.dropout_in_update)
        all_stats, epochs_run, early_stop = self._epochs(batch, targets)
        t_opt = time.perf_counter() - t

        t = time.perf_counter()
        stats = record_step_stats(batch, targets, all_stats)
        stats["ppo/epochs"] = float(epochs_run)
        stats["ppo/early_stop"] = float(early_stop)
        stats["ppo/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        # KL control sees the mean summed KL and the number of rollouts (TRL: batch_size).
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size)
        self.current_step += 1
        stats.update(batch.timing)
        stats.update(targets.timing)
        stats["time/ppo/optimize_step"] = t_opt
        stats["time/ppo/calc_stats"] = time.perf_counter() - t
        forward = batch.timing.get("time/ppo/forward_pass", 0.0)
        stats["time/ppo/total"] = forward + time.perf_counter() - t0
        return stats

    def _epochs(
        self, batch: PPOBatch, targets: PPOTargets
    ) -> tuple[list[dict[str, torch.Tensor]], int, bool]:
        """The PPO epochs: (every mini-batch's stats, epochs run, stopped early)."""
        cfg = self.config
        bsz = batch.input_ids.shape[0]
        all_stats: list[dict[str, torch.Tensor]] = []
        epochs_run = 0
        for _ in range(cfg.ppo_epochs):
            epochs_run += 1
            order = torch.randperm(bsz, generator=self.generator).to(self.device)
            for start in range(0, bsz, cfg.backward_batch_size):
                self._optimizer_step(batch, targets, order, start, all_stats)
            # TRL: early stopping at the epoch level, on the last mini-batch's policy KL.
            if cfg.early_stopping and float(all_stats[-1]["policy/policykl"]) > 1.5 * cfg.target_kl:
                return all_stats, epochs_run, True
        return all_stats, epochs_run, False

    def _optimizer_step(
        self,
        batch: PPOBatch,
        targets: PPOTargets,
        order: torch.Tensor,
        start: int,
        all_stats: list[dict[str, torch.Tensor]],
    ) -> None:
        """One backward batch from order[start:]: its mini-batches' gradients accumulated, then
        one optimiser step (with step_in_backward, the backward pass steps the parameters);
        each mini-batch's stats are appended to all_stats."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        accumulated = False
        for mb_start in range(start, start + cfg.backward_batch_size, cfg.mini_batch_size):
            idx = order[mb_start : mb_start + cfg.mini_batch_size]
            pg_loss, vf_loss, stats = self._minibatch_loss(batch, targets, idx)
            all_stats.append(stats)
            if stats["policy/skipped"] > 0:
                log.warning(
                    "mean ratio %.2f exceeds ratio_threshold %.2f: mini-batch skipped",
                    float(stats["policy/ratio"]),
                    cfg.ratio_threshold,
                )
                continue
            # x world: DDP and FSDP average the ranks' gradients, and each rank's loss already
            # covers the whole mini-batch (learner/parallel.py).
            world = self.parallel.world if self.parallel else 1
            loss = (pg_loss + vf_loss) * world / cfg.gradient_accumulation_steps
            if self.step_in_backward is not None:
                with self.step_in_backward.stepping():
                    loss.backward()
                continue  # stepped already, bucket by bucket
            loss.backward()
            accumulated = True
        if accumulated:  # a window of only skipped mini-batches does not step at all
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(
        self, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], scores: Scores
    ) -> dict[str, float]:
        """TRL's step(queries, responses, scores): prepare + update."""
        return self.update(self.prepare(queries, responses, scores))

    @torch.no_grad()
    def evaluate_loss(self, batch: PPOBatch, targets: PPOTargets) -> dict[str, float]:
        """The PPO losses on the whole batch at the current weights (eval mode, no update)."""
        self.model.eval()
        idx = torch.arange(batch.input_ids.shape[0], device=self.device)
        _, _, stats = self._minibatch_loss(batch, targets, idx, ratio_guard=False)
        return {f"ppo/{k}": float(v) for k, v in stats.items() if k.startswith("loss/")}

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self, include_model: bool = True) -> dict[str, Any]:
        """Everything a bit-identical resume needs: optimizer, KL controller, RNGs, step count,
        and (include_model) the model's trainable weights. Under FSDP the weights and optimiser
        moments are this rank's shards (a checkpoint per rank, resumable on the same world)."""
        state: dict[str, Any] = {
            "current_step": self.current_step,
            "optimizer": _map_tensors(self.optimizer.state_dict(), local),
            "kl_ctl": self.kl_ctl.state_dict(),
            "rng": rng_state(),
            "generator": self.generator.get_state(),
        }
        if include_model:
            state["model"] = _map_tensors(self.model.trainable_state_dict(), local)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "model" in state:
            params = dict(self.model.named_parameters())
            self.model.load_trainable_state_dict(
                {k: like(v, params[k]) if k in params else v for k, v in state["model"].items()}
            )
        load_optimizer_state(self.optimizer, self._as_params_shards(state["optimizer"]))
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.current_step = int(state["current_step"])

    def _as_params_shards(self, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        """Saved optimiser moments in their parameters' form (FSDP: DTensor shards)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        slots = {
            index: {
                key: like(value, params[index]) if key != "step" else value
                for key, value in entry.items()
            }
            for index, entry in optimizer_state["state"].items()
        }
        return {**optimizer_state, "state": slots}

    def servable_state_dict(self, trained_only: bool = False) -> dict[str, torch.Tensor]:
        """The policy's weights as the policy service loads them (PolicyWithValueHead's
        policy_state_dict_for_serving), whole: under FSDP every rank calls this together.

        Not copied: what is not merged or gathered are the live weights themselves, valid until
        the next update. Every caller (a push, a checkpoint's policy folder) uses them on the
        loop's thread between updates; a copy would be a model's worth of memory at each push
        (the trainer's peak, once the gradients are dropped in the backward pass)."""
        weights = self.model.policy_state_dict_for_serving(clone=False, trained_only=trained_only)
        return {name: full(tensor) for name, tensor in weights.items()}

    def whole_policy(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the servable LM's weights, the value head's), whole, for a checkpoint's policy
        folder: under FSDP every rank calls this together."""
        head = {k: full(v).detach() for k, v in self.model.v_head.state_dict().items()}
        # A tied tensor comes under its first name only, as save_pretrained writes a tie.
        return self.servable_state_dict(), head

    # --- internals ---------------------------------------------------------------------------
    @property
    def _full_kl(self) -> bool:
        return self.config.kl_penalty == "full"

    def _autocast(self) -> AbstractContextManager:
        """The forward passes' mixed-precision context (PPOConfig.mixed_precision)."""
        return autocast(self.config.mixed_precision, self.device)

    def _scores(self, scores: Scores) -> torch.Tensor:
        return scores_tensor(scores, self.config.batch_size, self.device)

    def _minibatch_loss(
        self, batch: PPOBatch, targets: PPOTargets, idx: torch.Tensor, ratio_guard: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The PPO losses and stats of mini-batch `idx`. With data parallelism this rank runs
        its share of the rows and the others' outputs are gathered in (learner/parallel.py)."""
        cfg = self.config
        dp = self.parallel
        rows = idx[dp.share(len(idx))] if dp else idx
        with self._autocast():
            logits, vpreds = policy_forward(self.train_model, batch, rows, cfg.pack_sequences)
        # Only the columns up to these rows' longest response: the rest is masked padding.
        logprobs = logprobs_from_logits(logits, batch.response_ids[rows, : logits.shape[1]])
        with torch.no_grad():
            entropy = entropy_from_logits(logits.float())
        if dp is not None:
            width = response_width(batch, idx)
            logprobs = with_own_rows(gather_rows(logprobs, dp, width), logprobs, dp)
            vpreds = with_own_rows(gather_rows(vpreds, dp, width), vpreds, dp)
            entropy = gather_rows(entropy, dp, width)
        cols = slice(0, logprobs.shape[1])
        return ppo_loss(
            old_logprobs=batch.logprobs[idx, cols],
            values=targets.values[idx, cols],
            logprobs=logprobs,
            vpreds=vpreds,
            mask=batch.mask[idx, cols],
            advantages=targets.advantages[idx, cols],
            returns=targets.returns[idx, cols],
            cliprange=cfg.cliprange,
            cliprange_value=cfg.cliprange_value,
            vf_coef=cfg.vf_coef,
            entropy=entropy,
            ratio_threshold=cfg.ratio_threshold if ratio_guard else None,
        )


def _map_tensors(value: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` (nested dicts and lists) with `change` applied to every tensor in it."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_tensors(v, change) for v in value]
    return value
