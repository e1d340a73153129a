"""Drift between the policy service's sampling log-probs and the trainer's old log-probs.

Both are the log-probability of the same sampled tokens under (what should be) the same
weights: the service's from its sampling pass, the trainer's from its own forward before the
update. Their gap measures how far the sampler is from the policy PPO assumes it sampled from
(another dtype, a stale weight version, a different kernel): verl logs it as
rollout_probs_diff. A statistic only: the PPO math uses the trainer's log-probs, as TRL does.
The service's log-probs are of the temperature-scaled distribution and the trainer's (as TRL
0.11's) of the unscaled one, so with generation.temperature != 1 the drift includes that gap.
"""

from __future__ import annotations

import torch


def logprob_drift(
    sampled: list[list[float]], trainer: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """rollout/logprob_diff_{mean,max}: |sampled - trainer| over the real response tokens.

    `sampled`: per sample, one log-prob per response token (no padding). `trainer`, `mask`:
    (batch, longest response) tensors, right-padded, mask 1 on real tokens.
    """
    padded = torch.zeros_like(trainer, dtype=torch.float64)
    for row, values in enumerate(sampled):
        if len(values) != int(mask[row].sum()):
            raise ValueError(
                f"sample {row}: {len(values)} sampled log-probs for {int(mask[row].sum())} tokens"
            )
        padded[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
    real = mask.bool()
    diff = (padded - trainer.detach().to(torch.float64)).abs()[real]
    if diff.numel() == 0:
        return {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0}
    return {
        "rollout/logprob_diff_mean": float(diff.mean()),
        "rollout/logprob_diff_max": float(diff.max()),
    }
