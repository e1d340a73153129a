"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2), as in classic TRL.

The per-token reward is  r_t = -beta * KL_t (+ score at the last token); the controller owns
beta. After every PPO step it sees the batch's mean KL (summed over response tokens) and the
number of rollouts in the step.
"""

from __future__ import annotations

from typing import Any, Protocol


class KLController(Protocol):
    value: float

    def update(self, current: float, n_steps: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AdaptiveKLController:
    """beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon), e_t = clip(KL_t / target - 1, +-0.2).

    A proportional controller in log space: beta rises when the policy drifts further than
    `target` nats from the reference and falls when it stays closer.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)  # e_t
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "adaptive",
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "adaptive")
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """beta stays where it started."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "fixed")
        self.value = float(state["value"])


def make_kl_controller(
    adaptive: bool, init_kl_coef: float, target: float, horizon: float
) -> AdaptiveKLController | FixedKLController:
    """TRL's choice: adap_kl_ctrl -> AdaptiveKLController, else FixedKLController."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind", kind) != kind:
        raise ValueError(
            f"KL controller state is for a {state['kind']!r} controller, this one is {kind!r} "
            "(adap_kl_ctrl changed between save and load?)"
        )
