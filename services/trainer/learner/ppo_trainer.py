"""PPOTrainer: TRL 0.11's PPOTrainer.step, in plain PyTorch, split into phases the loop can time.

    batch = trainer.prepare(queries, responses, scores)  # old logprobs, values, ref logprobs
    stats = trainer.update(batch)                         # rewards, GAE, PPO epochs, KL control
    stats = trainer.step(queries, responses, scores)      # both

Sequences are query + response, right-padded (positions 0.. are right for every row, no
position ids needed). Everything is aligned on response tokens: tensors are (B, T), T the longest
response; logprob/value column t belongs to response token t and comes from the position before
it. Stats use the classic TRL names, as plain floats.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from services.trainer.learner.config import PPOConfig
from services.trainer.learner.kl_control import make_kl_controller
from services.trainer.learner.ppo import (
    compute_advantages,
    compute_rewards,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    ppo_loss,
)
from services.trainer.learner.value_head import PolicyWithValueHead, causal_lm_logits

log = logging.getLogger("rlhf.trainer.ppo")

Scores = torch.Tensor | Sequence[torch.Tensor] | Sequence[float]


@dataclass
class PPOBatch:
    """One step's rollouts after `prepare`: model inputs and the old policy's numbers."""

    queries: list[torch.Tensor]
    responses: list[torch.Tensor]
    input_ids: torch.Tensor
    """(B, L) query + response, right-padded."""
    attention_mask: torch.Tensor
    """(B, L) 1 on real tokens."""
    query_lens: torch.Tensor
    """(B,) tokens per query."""
    response_ids: torch.Tensor
    """(B, T) response tokens, right-padded: the actions."""
    mask: torch.Tensor
    """(B, T) float, 1 on real response tokens."""
    logprobs: torch.Tensor
    """(B, T) log pi_old(a_t | s_t)."""
    ref_logprobs: torch.Tensor
    """(B, T) log pi_ref(a_t | s_t)."""
    values: torch.Tensor
    """(B, T) V_old(s_t)."""
    full_kl: torch.Tensor | None = None
    """(B, T) exact per-token KL(pi_old || pi_ref), only with kl_penalty="full"."""
    scores: torch.Tensor | None = None
    """(B,) reward-model scores as given (before score_clip), if given to prepare."""
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class PPOTargets:
    """What the PPO epochs regress on, from `targets(batch)` (TRL's compute_rewards/advantages)."""

    scores: torch.Tensor
    rewards: torch.Tensor
    non_score_reward: torch.Tensor
    kls: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl_coef: float
    timing: dict[str, float] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PPOTrainer:
    """PPO on a PolicyWithValueHead against a frozen reference (TRL 0.11 semantics).

    ref_model: a frozen causal LM (e.g. `model.create_reference()`) or PolicyWithValueHead;
    None: LoRA models use their base weights (`model.reference()`), others get
    `model.create_reference()` now.
    """

    def __init__(
        self,
        config: PPOConfig,
        model: PolicyWithValueHead,
        tokenizer: Any = None,
        ref_model: nn.Module | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if ref_model is None and not model.is_peft:
            ref_model = model.create_reference()
        self.ref_model = ref_model
        set_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)  # mini-batch shuffling
        self.params = [p for p in model.parameters() if p.requires_grad]
        # AdamW without weight decay is TRL's Adam.
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
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
        cfg = self.config
        queries = [torch.as_tensor(q).reshape(-1).long().to(self.device) for q in queries]
        responses = [torch.as_tensor(r).reshape(-1).long().to(self.device) for r in responses]
        for name, items in (("queries", queries), ("responses", responses)):
            if len(items) != cfg.batch_size:
                raise ValueError(
                    f"{name}: {len(items)} given, batch_size is {cfg.batch_size} (TRL's rule)"
                )
        if any(len(q) == 0 for q in queries):
            raise ValueError("every query needs at least one token")
        if any(len(r) == 0 for r in responses):
            raise ValueError("every response needs at least one token")
        score_tensor = self._scores(scores) if scores is not None else None

        bsz = len(queries)
        q_lens = torch.tensor([len(q) for q in queries], device=self.device)
        r_lens = torch.tensor([len(r) for r in responses], device=self.device)
        length, resp_len = int((q_lens + r_lens).max()), int(r_lens.max())
        input_ids = torch.full(
            (bsz, length), self.pad_token_id, dtype=torch.long, device=self.device
        )
        attention_mask = torch.zeros((bsz, length), dtype=torch.long, device=self.device)
        response_ids = torch.full((bsz, resp_len), self.pad_token_id, device=self.device)
        for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
            input_ids[i, : len(q) + len(r)] = torch.cat([q, r])
            attention_mask[i, : len(q) + len(r)] = 1
            response_ids[i, : len(r)] = r
        mask = (torch.arange(resp_len, device=self.device)[None, :] < r_lens[:, None]).float()
        batch = PPOBatch(
            queries=queries,
            responses=responses,
            input_ids=input_ids,
            attention_mask=attention_mask,
            query_lens=q_lens,
            response_ids=response_ids,
            mask=mask,
            logprobs=torch.empty(bsz, resp_len, device=self.device),
            ref_logprobs=torch.empty(bsz, resp_len, device=self.device),
            values=torch.empty(bsz, resp_len, device=self.device),
            full_kl=torch.empty(bsz, resp_len, device=self.device) if self._full_kl else None,
            scores=score_tensor,
        )

        self.model.eval()
        # In chunks of mini_batch_size, as TRL's batched_forward_pass, to bound memory.
        for start in range(0, bsz, cfg.mini_batch_size):
            idx = torch.arange(start, min(start + cfg.mini_batch_size, bsz), device=self.device)
            logits, values = self._policy_forward(batch, idx)
            ref_logits = self._reference_forward(batch, idx)
            labels = batch.response_ids[idx]
            batch.logprobs[idx] = logprobs_from_logits(logits, labels)
            batch.ref_logprobs[idx] = logprobs_from_logits(ref_logits, labels)
            batch.values[idx] = values
            if batch.full_kl is not None:
                full = kl_penalty(
                    "full",
                    logprobs_from_logits(logits, None),
                    logprobs_from_logits(ref_logits, None),
                )
                batch.full_kl[idx] = full
        batch.timing["time/ppo/forward_pass"] = time.perf_counter() - t0
        return batch

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
        self.model.train()
        bsz = batch.input_ids.shape[0]
        all_stats: list[dict[str, torch.Tensor]] = []
        epochs_run = 0
        early_stop = False
        for _ in range(cfg.ppo_epochs):
            epochs_run += 1
            order = torch.randperm(bsz, generator=self.generator).to(self.device)
            for start in range(0, bsz, cfg.backward_batch_size):
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
                    ((pg_loss + vf_loss) / cfg.gradient_accumulation_steps).backward()
                    accumulated = True
                if accumulated:  # a window of only skipped mini-batches does not step at all
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            # TRL: early stopping at the epoch level, on the last mini-batch's policy KL.
            if cfg.early_stopping and float(all_stats[-1]["policy/policykl"]) > 1.5 * cfg.target_kl:
                early_stop = True
                break
        t_opt = time.perf_counter() - t

        t = time.perf_counter()
        stats = self._record_step_stats(batch, targets, all_stats)
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
        and (include_model) the model's trainable weights."""
        state: dict[str, Any] = {
            "current_step": self.current_step,
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "rng": _rng_state(),
            "generator": self.generator.get_state(),
        }
        if include_model:
            state["model"] = self.model.trainable_state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "model" in state:
            self.model.load_trainable_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        _set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.current_step = int(state["current_step"])

    # --- internals ---------------------------------------------------------------------------
    @property
    def _full_kl(self) -> bool:
        return self.config.kl_penalty == "full"

    def _scores(self, scores: Scores) -> torch.Tensor:
        if isinstance(scores, torch.Tensor):
            flat = scores.detach().reshape(-1)
        else:
            flat = torch.stack([torch.as_tensor(s).detach().reshape(()) for s in scores])
        if flat.numel() != self.config.batch_size:
            raise ValueError(f"{flat.numel()} scores given, batch_size is {self.config.batch_size}")
        return flat.float().to(self.device)

    def _inputs(self, batch: PPOBatch, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows idx, trimmed to their longest sequence (right padding: trailing pads only)."""
        mask = batch.attention_mask[idx]
        length = int(mask.sum(1).max())
        return batch.input_ids[idx, :length], mask[:, :length]

    def _response_positions(self, batch: PPOBatch, idx: torch.Tensor, length: int) -> torch.Tensor:
        """(b, T) positions whose outputs predict response tokens: query_len - 1 + t."""
        steps = torch.arange(batch.mask.shape[1], device=self.device)
        return (batch.query_lens[idx, None] - 1 + steps[None, :]).clamp(max=length - 1)

    def _policy_forward(
        self, batch: PPOBatch, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (b, T, V), values (b, T)) at the response positions of rows idx."""
        input_ids, attention_mask = self._inputs(batch, idx)
        pos = self._response_positions(batch, idx, input_ids.shape[1])
        return self.model(input_ids, attention_mask, positions=pos)

    def _reference_forward(self, batch: PPOBatch, idx: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = self._inputs(batch, idx)
        pos = self._response_positions(batch, idx, input_ids.shape[1])
        if self.ref_model is None:
            with self.model.reference():
                logits, _ = self.model(input_ids, attention_mask, positions=pos)
        elif isinstance(self.ref_model, PolicyWithValueHead):
            logits, _ = self.ref_model(input_ids, attention_mask, positions=pos)
        else:
            logits, _ = causal_lm_logits(self.ref_model, input_ids, attention_mask, pos)
        return logits

    def _minibatch_loss(
        self, batch: PPOBatch, targets: PPOTargets, idx: torch.Tensor, ratio_guard: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        logits, vpreds = self._policy_forward(batch, idx)
        logprobs = logprobs_from_logits(logits, batch.response_ids[idx])
        return ppo_loss(
            old_logprobs=batch.logprobs[idx],
            values=targets.values[idx],
            logprobs=logprobs,
            vpreds=vpreds,
            mask=batch.mask[idx],
            advantages=targets.advantages[idx],
            returns=targets.returns[idx],
            cliprange=cfg.cliprange,
            cliprange_value=cfg.cliprange_value,
            vf_coef=cfg.vf_coef,
            logits=logits,
            ratio_threshold=cfg.ratio_threshold if ratio_guard else None,
        )

    def _record_step_stats(
        self, batch: PPOBatch, targets: PPOTargets, all_stats: list[dict[str, torch.Tensor]]
    ) -> dict[str, float]:
        """TRL's record_step_stats as floats: per-token arrays become masked means, and the
        histograms (objective/kl_dist, tokens/*_dist, ppo/policy/advantages) are left out."""
        mask = batch.mask
        kl_list = (targets.kls * mask).sum(-1)  # summed over each response
        mean_kl = float(kl_list.mean())
        if mean_kl < -1.0 and targets.kl_coef > 0:
            log.warning(
                "KL divergence is negative (%.2f): check that generation samples from the "
                "policy's own distribution (top_k=0, top_p=1, temperature=1)",
                mean_kl,
            )
        scores = targets.scores
        raw = batch.scores if batch.scores is not None else scores
        q_lens = batch.query_lens.float()
        r_lens = batch.mask.sum(1)
        stats = {
            "objective/kl": mean_kl,
            "objective/logprobs": float(masked_mean(batch.logprobs, mask)),
            "objective/ref_logprobs": float(masked_mean(batch.ref_logprobs, mask)),
            "objective/kl_coef": targets.kl_coef,
            "objective/entropy": float((-batch.logprobs * mask).sum(-1).mean()),
            "ppo/mean_non_score_reward": float(masked_mean(targets.non_score_reward, mask)),
            "ppo/mean_scores": float(scores.mean()),
            "ppo/std_scores": _std(scores),
            "env/reward_mean": float(raw.mean()),
            "env/reward_std": _std(raw),
            "tokens/queries_len_mean": float(q_lens.mean()),
            "tokens/queries_len_std": _std(q_lens),
            "tokens/responses_len_mean": float(r_lens.mean()),
            "tokens/responses_len_std": _std(r_lens),
        }
        for key in all_stats[0]:
            stats[f"ppo/{key}"] = float(torch.stack([s[key].float() for s in all_stats]).mean())
        stats["ppo/val/var_explained"] = 1.0 - stats["ppo/val/error"] / max(
            stats["ppo/returns/var"], 1e-8
        )
        stats["ppo/kl"] = stats["objective/kl"]  # the seed's name for it
        return stats


def _std(x: torch.Tensor) -> float:
    return float(x.float().std()) if x.numel() > 1 else 0.0


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
