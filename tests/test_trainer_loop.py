"""The coordinating loop in one process (in-process transports, tiny model): resume is exact,
bad reward answers fail the step without applying anything, a step that fails in any phase
leaves no metrics row or checkpoint claiming it, the sampler's and the trainer's log-probs
agree, configs load and override."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.local_transports import LocalPolicy, LocalReward
from services.reward.backends.vader import VaderBackend
from services.trainer.config import TrainConfig, load_train_config
from services.trainer.orchestrator.checkpoint import latest_checkpoint
from services.trainer.orchestrator.drift import logprob_drift
from services.trainer.orchestrator.loop import StepFailed, TrainingLoop
from services.trainer.orchestrator.metrics import read_metrics
from services.trainer.orchestrator.peers import FatalError, Pushed
from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer
from services.trainer.orchestrator.trainer_state import read_state


class ScriptedReward:
    """A reward source whose answers a test controls."""

    address = "scripted:0"

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def name(self) -> str:
        return "scripted"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.answer(responses) if callable(self.answer) else self.answer  # type: ignore[return-value]

    def close(self) -> None:
        pass


def tiny_run(model: Path) -> list[str]:
    """Overrides of a quick run on the tiny LM (a step in well under a second)."""
    return [
        f"model_name={model}",
        "batch_size=4",
        "mini_batch_size=2",
        "ppo_epochs=2",
        "learning_rate=1e-3",
        "log_with=jsonl",
        "max_new_tokens=6",
    ]


def _config(model: Path, out: Path, steps: int, run_id: str, lora: bool = False) -> TrainConfig:
    overrides = [
        *tiny_run(model),
        f"use_lora={lora}",
        f"run.steps={steps}",
        "run.save_every=0",
        f"run.output_dir={out}",
        f"run.run_id={run_id}",
        "run.retry_backoff_s=0.01",
        "run.step_retries=2",
    ]
    return load_train_config(None, overrides)


def _vader_mixer() -> RewardMixer:
    mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
    mixer.set_endpoints([EndpointSpec("local:1")])
    return mixer


def _loop(config: TrainConfig, model: Path, resume: bool = False) -> TrainingLoop:
    return TrainingLoop(config, LocalPolicy(str(model)), _vader_mixer(), resume=resume)


@pytest.mark.parametrize("lora", [False, True])
def test_resumed_run_matches_an_uninterrupted_one(
    tiny_lm: Path, tmp_path: Path, lora: bool
) -> None:
    straight = _loop(_config(tiny_lm, tmp_path, 4, "straight", lora), tiny_lm)
    straight.run()

    first = _loop(_config(tiny_lm, tmp_path, 2, "resumed", lora), tiny_lm)
    first.run()
    assert first.step == 2
    second = _loop(_config(tiny_lm, tmp_path, 4, "resumed", lora), tiny_lm, resume=True)
    assert second.step == 2
    second.run()

    a, b = straight.model.trainable_state_dict(), second.model.trainable_state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The metrics file of the resumed run has each step once.
    rows = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (lambda responses: [0.0] * (len(responses) - 1), "returned 3 scores for 4 samples"),
        (lambda responses: [math.nan] * len(responses), "non-finite"),
    ],
)
def test_bad_reward_answer_fails_the_step_and_applies_nothing(
    tiny_lm: Path, tmp_path: Path, answer: object, fragment: str
) -> None:
    config = _config(tiny_lm, tmp_path, 2, "bad")
    scripted = ScriptedReward(lambda r: [0.5] * len(r))  # answers its probe well
    mixer = RewardMixer(lambda address: scripted)
    mixer.set_endpoints([EndpointSpec("scripted:0")])
    loop = TrainingLoop(config, LocalPolicy(str(tiny_lm)), mixer)
    before = {k: v.clone() for k, v in loop.model.trainable_state_dict().items()}
    position = loop.sampler.state_dict()
    version = loop.weight_version

    scripted.answer = answer
    with pytest.raises(StepFailed, match=fragment):
        loop.run_step()
    assert loop.step == 0 and loop.weight_version == version
    assert loop.sampler.state_dict() == position
    after = loop.model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    scripted.answer = lambda r: [0.5] * len(r)  # the source recovers: the step goes through
    result = loop.run_step()
    assert result.step == 1 and result.weight_version == version + 1


def test_config_sections_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  learning_rate: 2.0e-5\n  use_lora: true\nrun:\n  steps: 7\n")
    config = load_train_config(
        path.read_text(), ["ppo_epochs=2", "generation.top_k=5", "run.rewards=a:1=2,b:2"]
    )
    assert config.ppo.learning_rate == 2e-5 and config.ppo.use_lora is True
    assert config.ppo.ppo_epochs == 2 and config.generation.top_k == 5
    assert config.run.steps == 7 and config.run.rewards == ["a:1=2", "b:2"]
    with pytest.raises(ValueError, match="unknown field"):
        load_train_config("run:\n  stepz: 3\n")
    with pytest.raises(ValueError, match="unknown field 'nope'"):
        load_train_config(None, ["nope=1"])
    with pytest.raises(ValueError, match="mini_batch_size"):
        load_train_config(None, ["batch_size=3"])
    assert EndpointSpec.parse("rm@h:1=0.2") == EndpointSpec("h:1", 0.2, "rm")


def test_a_swap_names_the_first_step_that_uses_it() -> None:
    """Between steps a swap applies to the next step; during step N (even while the loop has
    already counted N as done and is pushing its weights) it applies from N + 1, and step N
    keeps the sources it started with."""
    mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
    assert mixer.set_endpoints([EndpointSpec("local:1")])[1] is None
    snapshot = mixer.begin_step(7)
    applied, in_step = mixer.set_endpoints([EndpointSpec("local:2")])
    assert in_step == 7 and [s.address for s in applied] == ["local:2"]
    assert [s.spec.address for s in snapshot] == ["local:1"]
    mixer.end_step()
    assert [s.spec.address for s in mixer.begin_step(8)] == ["local:2"]
    mixer.end_step()
    assert mixer.set_endpoints([EndpointSpec("local:3")])[1] is None


class FailingPolicy(LocalPolicy):
    """LocalPolicy whose generate or push_weights fails (fatally) from a given step on."""

    def __init__(self, model: str, phase: str, at_step: int) -> None:
        super().__init__(model)
        self.phase, self.at_step, self.step = phase, at_step, 0

    def generate(self, prompts: list[str], gen: object, seed: int):  # noqa: ANN201
        self.step += 1
        if self.phase == "generate" and self.step >= self.at_step:
            raise FatalError("Generate on local failed: INTERNAL: injected", "local")
        return super().generate(prompts, gen, seed)  # type: ignore[arg-type]

    def push_weights(  # type: ignore[override]
        self, tensors: dict, version: int, full: object = None
    ) -> Pushed:
        if self.phase == "push" and self.step >= self.at_step:
            raise FatalError("UpdateWeights on local failed: INTERNAL: injected", "local")
        return super().push_weights(tensors, version)


@pytest.mark.parametrize("phase", ["generate", "score", "update", "push"])
def test_a_failed_step_leaves_no_metrics_row_or_checkpoint_claiming_it(
    tiny_lm: Path, tmp_path: Path, phase: str
) -> None:
    """Step 2 of 3 fails in `phase`. Before the update nothing changed: the run's end writes
    the boundary checkpoint of step 1. In the update or the push the learner changed: no
    checkpoint at all (the last boundary one, none here, stays the latest) and no more steps."""
    config = _config(tiny_lm, tmp_path, 3, f"fail-{phase}")
    policy = FailingPolicy(str(tiny_lm), phase, at_step=2)
    scripted = ScriptedReward(lambda r: [0.5] * len(r))
    mixer = RewardMixer(lambda address: scripted)
    mixer.set_endpoints([EndpointSpec("scripted:0")])
    loop = TrainingLoop(config, policy, mixer)
    after_step_1: dict[str, torch.Tensor] = {}

    def on_step(result: object) -> None:
        after_step_1.update({k: v.clone() for k, v in loop.model.trainable_state_dict().items()})
        if phase == "score":
            scripted.answer = lambda r: [0.5] * (len(r) + 1)  # a wrong count: fatal
        if phase == "update":
            real = loop.trainer.update

            def update_then_fail(batch: object) -> dict:
                real(batch)  # the learner's state changes, then the update fails
                raise RuntimeError("injected failure inside the update")

            loop.trainer.update = update_then_fail  # type: ignore[method-assign]

    failure = RuntimeError if phase == "update" else StepFailed
    with pytest.raises(failure, match="injected|returned 5 scores for 4 samples"):
        loop.run(on_step=on_step)
    assert loop.step == 1
    rows = read_metrics(tmp_path / f"fail-{phase}" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1]
    checkpoints = loop.checkpoints
    assert not (checkpoints / "step-000002").exists()
    if phase in ("generate", "score"):
        assert latest_checkpoint(checkpoints) == checkpoints / "step-000001"
        state = read_state(checkpoints / "step-000001")
        assert state["step"] == 1
        saved = state["trainer"]["model"]
        assert all(torch.equal(saved[k], after_step_1[k]) for k in after_step_1)
    else:
        assert latest_checkpoint(checkpoints) is None
        with pytest.raises(StepFailed, match="step 2 failed after its update"):
            loop.run_step()


def test_policy_and_trainer_log_probs_agree_in_process(tiny_lm: Path, tmp_path: Path) -> None:
    """The same model in the same dtype: the engine's sampling log-probs and the trainer's old
    log-probs of the same tokens differ only by float32 rounding (another batch shape, left vs
    right padding, a KV cache vs one full forward reorder the sums): measured at most 4.8e-7
    (a few ulps of values near -4). 1e-4 leaves room for that and stays far below what a real
    fault gives: in this random 72-token model neighbouring tokens' log-probs differ by 0.1 to
    1 nat, so a token off by one position shows at once."""
    loop = _loop(_config(tiny_lm, tmp_path, 2, "drift"), tiny_lm)
    for step in (1, 2):  # step 2 samples from the pushed weights
        stats = loop.run_step().stats
        assert 0.0 <= stats["rollout/logprob_diff_mean"] <= stats["rollout/logprob_diff_max"]
        assert stats["rollout/logprob_diff_max"] < 1e-4, (step, stats)


def test_log_prob_drift_counts_real_tokens_only() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    drift = logprob_drift([[-1.5, -2.0], [-0.25]], trainer, mask)
    assert drift == {"rollout/logprob_diff_mean": 0.25, "rollout/logprob_diff_max": 0.5}
    with pytest.raises(ValueError, match="sample 1: 2 sampled log-probs for 1 tokens"):
        logprob_drift([[-1.5, -2.0], [-0.25, -1.0]], trainer, mask)
