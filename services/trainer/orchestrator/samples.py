"""A step's sample (its rollout and rewards, as the learner takes them) and its checkpoint form.

At run.max_staleness >= 1 samples are made ahead of the learner (rollouts.py); those made for
steps after a checkpoint travel in it (trainer_state.py: tensors + JSON, no pickle), so a
resume hands out exactly the samples an uninterrupted run would have trained on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.trainer.orchestrator.peers import Rollout


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


@dataclass
class Sample:
    """One step's rollout and rewards: all of the step that happens outside the learner."""

    step: int
    prompts: list[str]
    rollout: Rollout
    scores: list[float]
    per_source: dict[str, list[float]]
    basis: int
    """The version, in this process's numbering, of the weights that generated it (for
    rollout/staleness): the rollout's own, except for a sample a resume restored (versions are
    renumbered on a resume, never reused)."""
    times: dict[str, float] = field(default_factory=dict)
    """time/generate, time/score and the timeline/{generate,score}_{start,end} unix times."""
    sampler_before: dict[str, int] = field(default_factory=dict)
    sampler_after: dict[str, int] = field(default_factory=dict)
    """The prompt sampler's state before and after this sample's prompts were drawn."""

    def stats(self) -> dict[str, float]:
        """The sample's statistics: reward mean and std, each source's mean, response length,
        the weight version that generated it."""
        stats: dict[str, float] = {}
        stats["env/reward_mean"], stats["env/reward_std"] = mean_std(self.scores)
        for name, values in self.per_source.items():
            stats[f"env/reward/{name}"] = mean_std(values)[0]
        response_ids = self.rollout.response_ids
        stats["env/response_length"] = float(sum(len(r) for r in response_ids) / len(response_ids))
        stats["rollout/weight_version"] = float(self.rollout.weight_version)
        return stats

    def to_state(self, version_now: int) -> dict[str, Any]:
        """The sample as checkpoint data (trainer_state.py: tensors + JSON, no pickle).
        `version_now`: the run's weight version at the checkpoint."""
        r = self.rollout
        return {
            "step": self.step,
            "prompts": list(self.prompts),
            "query_ids": [torch.tensor(q, dtype=torch.long) for q in r.query_ids],
            "response_ids": [torch.tensor(q, dtype=torch.long) for q in r.response_ids],
            # float64 holds every value the services report (float32, or a float) exactly
            "response_logprobs": [
                torch.tensor(q, dtype=torch.float64) for q in r.response_logprobs
            ],
            "response_texts": list(r.response_texts),
            "weight_version": r.weight_version,
            "instance_id": r.instance_id,
            "scores": list(self.scores),
            "per_source": {name: list(v) for name, v in self.per_source.items()},
            "times": dict(self.times),
            "sampler_before": dict(self.sampler_before),
            "sampler_after": dict(self.sampler_after),
            "versions_behind": version_now - self.basis,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any], version_now: int) -> Sample:
        """What to_state wrote; `version_now`: the run's weight version after the resume's
        first push. Raises ValueError for data that is not a sample."""
        try:
            rollout = Rollout(
                query_ids=[t.tolist() for t in data["query_ids"]],
                response_ids=[t.tolist() for t in data["response_ids"]],
                response_logprobs=[t.tolist() for t in data["response_logprobs"]],
                response_texts=list(data["response_texts"]),
                weight_version=int(data["weight_version"]),
                instance_id=str(data["instance_id"]),
            )
            sample = cls(
                step=int(data["step"]),
                prompts=list(data["prompts"]),
                rollout=rollout,
                scores=[float(s) for s in data["scores"]],
                per_source={k: [float(s) for s in v] for k, v in data["per_source"].items()},
                times={k: float(v) for k, v in data["times"].items()},
                sampler_before=dict(data["sampler_before"]),
                sampler_after=dict(data["sampler_after"]),
                basis=version_now - int(data["versions_behind"]),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"a prefetched sample in a checkpoint is malformed: {err!r}") from err
        counts = {len(rollout.query_ids), len(rollout.response_ids), len(sample.scores)}
        if len(counts) != 1 or len(rollout.response_logprobs) != len(rollout.response_ids):
            raise ValueError(f"the prefetched sample of step {sample.step} is inconsistent")
        return sample


@dataclass
class Failed:
    """A step whose rollout failed (after retries): the loop raises `error` when it takes it."""

    step: int
    error: BaseException
    sampler_before: dict[str, int]


def overlap_s(times: dict[str, float], trained: Iterable[tuple[float, float]]) -> float:
    """time/overlap: seconds of a step's rollout (its generate and score intervals in `times`,
    timeline/* unix times) that ran while the learner trained (`trained`: earlier steps'
    (train_start, train_end)); 0 in lock-step, where they never meet."""
    total = 0.0
    for phase in ("generate", "score"):
        start, end = times[f"timeline/{phase}_start"], times[f"timeline/{phase}_end"]
        for begin, finish in trained:
            total += max(0.0, min(end, finish) - max(start, begin))
    return total
