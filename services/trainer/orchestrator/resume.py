"""The reward endpoints a resumed run scores with.

What was in force at the checkpoint comes back (its trainer_state.json keeps their spec
strings), and every swap journaled after it (run.json's "swaps", each with the step it applied
from) is re-applied from that step, so a resume scores each step with the same sources as the
run it continues. A caller that names endpoints overrides all of that, logged. Every endpoint
is probed before the run starts; one that fails its probe fails the resume, named: nothing
falls back to the trainer's defaults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from services.trainer.orchestrator.rewards import EndpointSpec, RewardError, RewardMixer

log = logging.getLogger("rlhf.trainer.resume")


@dataclass
class Swap:
    """One SetRewardEndpoints of a run: the endpoints in force from step `from_step` on."""

    from_step: int
    rewards: list[str]
    """Spec strings (EndpointSpec's text form, names resolved)."""

    def to_json(self) -> dict[str, Any]:
        return {"from_step": self.from_step, "rewards": list(self.rewards)}

    @classmethod
    def from_json(cls, data: Any) -> Swap:
        """Raises ValueError for anything but {"from_step": int >= 1, "rewards": [spec...]}."""
        if not isinstance(data, dict):
            raise ValueError("a swap is an object")
        step, rewards = data.get("from_step"), data.get("rewards")
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"swap from_step {step!r} is not a step number")
        if not isinstance(rewards, list) or not rewards:
            raise ValueError("a swap names its endpoints")
        for text in rewards:
            if not isinstance(text, str):
                raise ValueError("a swap's endpoints are strings")
            EndpointSpec.parse(text)  # refuses a malformed one with its own ValueError
        return cls(step, list(rewards))


@dataclass
class RewardPlan:
    """What a resumed run starts with (`initial`) and re-applies later (`swaps`)."""

    checkpoint_step: int
    initial: list[str]
    swaps: list[Swap] = field(default_factory=list)
    """Swaps journaled after the checkpoint, re-applied from their steps."""
    caller_wins: bool = False


def plan_rewards(
    run_id: str, checkpoint_step: int, saved: list[str], caller: list[str], journal: list[Swap]
) -> RewardPlan:
    """The endpoints of a resume from the checkpoint of `checkpoint_step`, whose endpoints in
    force were `saved`. `caller`: endpoints the resuming caller named (empty: none); they win,
    and an INFO line names both lists. Raises ValueError when no endpoints are known at all."""
    later = [s for s in journal if s.from_step > checkpoint_step]
    if caller:
        log.info(
            "resume: the caller's reward endpoints replace the checkpoint's",
            extra={
                "run": run_id,
                "caller_rewards": caller,
                "checkpoint_rewards": saved,
                "swaps_dropped": [s.to_json() for s in later],
            },
        )
        return RewardPlan(checkpoint_step, list(caller), [], caller_wins=True)
    if not saved:
        raise ValueError(
            f"the checkpoint of run {run_id} at step {checkpoint_step} names no reward "
            "endpoints: name them for the resume (StartRun.rewards, run.rewards or --reward)"
        )
    return RewardPlan(checkpoint_step, list(saved), later)


def apply_plan(mixer: RewardMixer, plan: RewardPlan) -> None:
    """Probes every endpoint of the plan; puts `initial` in force and schedules the swaps.
    Raises RewardError naming the endpoint (and the swap's step) that failed its probe."""
    mixer.scored_through(plan.checkpoint_step)  # a swap while the run loads applies after it
    mixer.set_endpoints([EndpointSpec.parse(r) for r in plan.initial])
    for swap in plan.swaps:
        try:
            sources = mixer.probe([EndpointSpec.parse(r) for r in swap.rewards])
        except RewardError as err:
            raise RewardError(
                f"the swap journaled from step {swap.from_step} cannot be re-applied: {err}",
                err.peer,
            ) from err
        mixer.schedule(sources, swap.from_step)


def journal_swap(journal: list[Swap], swap: Swap) -> list[Swap]:
    """The journal with `swap` recorded: entries that had not applied yet when it was made
    (from its step on) are dropped, as the swap cancelled them."""
    return [s for s in journal if s.from_step < swap.from_step] + [swap]
