"""A PPO step's statistics under TRL 0.11's names, as plain floats (TRL's record_step_stats)."""

from __future__ import annotations

import logging

import torch

from services.trainer.learner.batch import PPOBatch, PPOTargets
from services.trainer.learner.ppo import masked_mean

log = logging.getLogger("rlhf.trainer.ppo")


def record_step_stats(
    batch: PPOBatch, targets: PPOTargets, all_stats: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """TRL's record_step_stats as floats: per-token arrays become masked means, the mini-batch
    stats their mean, and the histograms (objective/kl_dist, tokens/*_dist,
    ppo/policy/advantages) are left out."""
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
