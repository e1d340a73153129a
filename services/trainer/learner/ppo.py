"""PPO for language models, as small pure functions (classic TRL <= 0.11 semantics).

Shapes: B rollouts, T response tokens (right-padded), V vocabulary. `mask` is 1 on real response
tokens, 0 on padding. Names follow the papers:
  Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (ratio r_t, clip eps),
  Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (delta_t, gamma, lambda),
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL penalty beta).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "clip_by_value",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_advantages",
    "compute_rewards",
    "entropy_from_logits",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_loss",
]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(pi(. | s_t)) per position: (..., V) -> (...); current TRL's chunked helper."""
    # trl is imported on first use: it pulls in accelerate and datasets, which the rest of this
    # module (and whoever imports it for the math alone) does not need.
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    return trl_entropy(logits)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """log pi(label | context): (B, T, V) logits, (B, T) labels -> (B, T).

    labels=None returns the full log-softmax (B, T, V), as TRL's gather=False did.
    """
    if labels is None:
        return F.log_softmax(logits, dim=-1)
    from trl.trainer.utils import selective_log_softmax  # see entropy_from_logits

    return selective_log_softmax(logits, labels)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of `values` where mask is 1 (over all entries, or along `axis`)."""
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance where mask is 1; unbiased (Bessel's n / (n - 1)) by default, as TRL."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n == 0:
            raise ValueError("masked_var: the mask is empty")
        if n == 1:
            raise ValueError("masked_var: one unmasked element has no unbiased variance")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the unmasked entries; shift_mean=False keeps the mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def clip_by_value(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Elementwise clamp of x to [low, high] (tensor bounds)."""
    return torch.max(torch.min(x, high), low)


def kl_penalty(mode: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref).

    kl:   log pi(a) - log pi_ref(a)                (unbiased, can be negative per token)
    abs:  |log pi(a) - log pi_ref(a)|
    mse:  0.5 * (log pi(a) - log pi_ref(a))^2
    full: sum_v pi(v) * (log pi(v) - log pi_ref(v)) -- exact; here the arguments are the
          full-vocabulary log-probabilities (..., V) and the result drops the last axis.
    """
    if mode == "kl":
        return logprobs - ref_logprobs
    if mode == "abs":
        return (logprobs - ref_logprobs).abs()
    if mode == "mse":
        return 0.5 * (logprobs - ref_logprobs).square()
    if mode == "full":
        # F.kl_div(input, target) = sum target * (log target - input), both given as logs.
        return F.kl_div(ref_logprobs, logprobs, log_target=True, reduction="none").sum(-1)
    raise ValueError(f"unknown kl_penalty {mode!r}; choose kl, abs, mse or full")


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    masks: torch.Tensor,
    kl_coef: float,
    kl_penalty_mode: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * KL_t, plus the score at the last response token.

    scores (B,), logprobs/ref_logprobs (B, T) -- or (B, T, V) for kl_penalty_mode="full" --,
    masks (B, T). Returns (rewards, non_score_reward, kls), each (B, T). Masked positions carry
    values too; every consumer masks them out (as TRL).
    """
    kls = kl_penalty(kl_penalty_mode, logprobs, ref_logprobs)
    non_score_reward = -kl_coef * kls
    rewards = non_score_reward.clone()
    positions = torch.arange(masks.shape[1], device=masks.device).expand_as(masks)
    if bool((masks.sum(1) == 0).any()):
        raise ValueError("compute_rewards: a rollout has no response token")
    last = (positions * (masks > 0)).argmax(dim=1)  # index of the last non-masked token
    rows = torch.arange(masks.shape[0], device=masks.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, non_score_reward, kls


def compute_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE, backwards over the response: returns (values masked, advantages whitened, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t            (V_T = 0 past the end / on padding)
    A_t     = delta_t + gamma * lambda * A_{t+1}
    returns = A_t + V_t  (before whitening); advantages are whitened over the mask.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    last_gae_lam = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    length = rewards.shape[-1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae_lam = delta + gamma * lam * last_gae_lam
        advantages_reversed.append(last_gae_lam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask).detach()
    return values, advantages, returns


def clipped_value_loss(
    vpreds: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L^VF, the fraction of tokens where the clipped term was the larger): see ppo_loss."""
    vpred_clipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)
    return vf_loss, vf_clipfrac


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L^CLIP, the fraction of tokens where clipping bound, the ratios r_t): see ppo_loss."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)
    return pg_loss, pg_clipfrac, ratio


def ppo_loss(
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    entropy: torch.Tensor | None = None,
    ratio_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss and clipped value loss.

    r_t     = exp(log pi(a_t) - log pi_old(a_t))
    L^CLIP  = mean( max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps)) )
    V^clip  = clip(V_new, V_old - eps_v, V_old + eps_v)
    L^VF    = 0.5 * mean( max((V_new - R_t)^2, (V^clip - R_t)^2) )

    Returns (pg_loss, vf_coef * vf_loss, stats); stats["loss/value"] is the unscaled L^VF (as
    TRL). If the mean ratio exceeds `ratio_threshold`, both losses are zeroed and
    stats["policy/skipped"] is 1: the caller must not step on this mini-batch. `entropy`: the
    policy's per-token entropy H(pi(. | s_t)), for stats["policy/entropy"].
    """
    vf_loss, vf_clipfrac = clipped_value_loss(vpreds, values, returns, mask, cliprange_value)
    pg_loss, pg_clipfrac, ratio = clipped_policy_loss(
        logprobs, old_logprobs, advantages, mask, cliprange
    )
    loss = pg_loss + vf_coef * vf_loss
    avg_ratio = masked_mean(ratio, mask).detach()
    skipped = ratio_threshold is not None and bool(avg_ratio > ratio_threshold)
    if skipped:
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0

    with torch.no_grad():
        logp_diff = logprobs - old_logprobs
        unbiased = bool(mask.sum() > 1)  # a one-token mini-batch still gets (biased) stats
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "loss/total": loss.detach(),
            "policy/approxkl": 0.5 * masked_mean(logp_diff**2, mask),
            "policy/policykl": masked_mean(-logp_diff, mask),
            "policy/clipfrac": pg_clipfrac.detach(),
            "policy/advantages_mean": masked_mean(advantages, mask),
            "policy/ratio": avg_ratio,
            "policy/skipped": torch.tensor(float(skipped)),
            "returns/mean": masked_mean(returns, mask),
            "returns/var": masked_var(returns, mask, unbiased),
            "val/vpred": masked_mean(vpreds, mask),
            "val/error": masked_mean((vpreds - returns) ** 2, mask),
            "val/clipfrac": vf_clipfrac.detach(),
            "val/mean": masked_mean(values, mask),
            "val/var": masked_var(values, mask, unbiased),
        }
        if entropy is not None:
            stats["policy/entropy"] = masked_mean(entropy, mask)
    return pg_loss, vf_coef * vf_loss, stats
