"""A PPO step's rollouts as padded tensors (PPOBatch), and what the PPO epochs regress on
(PPOTargets).

Sequences are query + response, right-padded (positions 0.. are right for every row, no
position ids needed). Everything is aligned on response tokens: tensors are (B, T), T the longest
response; logprob/value column t belongs to response token t and comes from the position before
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

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


def as_token_rows(
    items: Sequence[torch.Tensor], name: str, batch_size: int, device: torch.device
) -> list[torch.Tensor]:
    """Each item as a 1-D long tensor on `device`; exactly batch_size of them, none empty."""
    rows = [torch.as_tensor(x).reshape(-1).long().to(device) for x in items]
    if len(rows) != batch_size:
        raise ValueError(f"{name}: {len(rows)} given, batch_size is {batch_size} (TRL's rule)")
    return rows


def pad_rollouts(
    queries: list[torch.Tensor],
    responses: list[torch.Tensor],
    pad_token_id: int,
    full_kl: bool,
    scores: torch.Tensor | None,
) -> PPOBatch:
    """The rollouts right-padded into a PPOBatch whose old-policy tensors are still zeros (the
    padding columns stay so)."""
    device = queries[0].device
    bsz = len(queries)
    q_lens = torch.tensor([len(q) for q in queries], device=device)
    r_lens = torch.tensor([len(r) for r in responses], device=device)
    length, resp_len = int((q_lens + r_lens).max()), int(r_lens.max())
    input_ids = torch.full((bsz, length), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((bsz, length), dtype=torch.long, device=device)
    response_ids = torch.full((bsz, resp_len), pad_token_id, device=device)
    for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
        input_ids[i, : len(q) + len(r)] = torch.cat([q, r])
        attention_mask[i, : len(q) + len(r)] = 1
        response_ids[i, : len(r)] = r
    mask = (torch.arange(resp_len, device=device)[None, :] < r_lens[:, None]).float()
    return PPOBatch(
        queries=queries,
        responses=responses,
        input_ids=input_ids,
        attention_mask=attention_mask,
        query_lens=q_lens,
        response_ids=response_ids,
        mask=mask,
        logprobs=torch.zeros(bsz, resp_len, device=device),
        ref_logprobs=torch.zeros(bsz, resp_len, device=device),
        values=torch.zeros(bsz, resp_len, device=device),
        full_kl=torch.zeros(bsz, resp_len, device=device) if full_kl else None,
        scores=scores,
    )


def scores_tensor(scores: Scores, batch_size: int, device: torch.device) -> torch.Tensor:
    """(batch_size,) float32 scores on `device`, from a tensor or a sequence of numbers."""
    if isinstance(scores, torch.Tensor):
        flat = scores.detach().reshape(-1)
    else:
        flat = torch.stack([torch.as_tensor(s).detach().reshape(()) for s in scores])
    if flat.numel() != batch_size:
        raise ValueError(f"{flat.numel()} scores given, batch_size is {batch_size}")
    return flat.float().to(device)
