"""A policy service that restarts under a run (issue #13): the trainer notices on Generate or on
a push (the service's instance id changes on every start), pushes its full weights again and
regenerates, so the run ends bit-exact with one that was never interrupted; "another writer" is
reported only when the same instance serves a version the run did not push; weight versions
never repeat across a resume (the run folder's high-water file)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from bench.local_transports import LocalPolicy
from rlhf.server import build_server
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer, servicers
from services.trainer.config import TrainConfig
from services.trainer.orchestrator.loop import StepFailed, TrainingLoop
from services.trainer.orchestrator.metrics import read_metrics
from services.trainer.orchestrator.peers import Pushed, TransientError
from services.trainer.orchestrator.transports import GrpcPolicy
from services.trainer.orchestrator.weight_sync import (
    HIGH_WATER_FILE,
    read_high_water,
    write_high_water,
)
from tests.servers import NO_AUTH_FLAG, open_config
from tests.test_trainer_loop import _config, _vader_mixer
from tools.launch import ServiceProcess, start_service


class RestartablePolicy(LocalPolicy):
    """LocalPolicy whose engine can be replaced by a freshly started one (a new instance id,
    base weights as version 0), and whose pushes a test can script."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model
        self.pushes: list[tuple[int, int]] = []
        """(version, tensor count) of every push that reached an engine."""
        self.before_push: list[str] = []
        """What to do at the next pushes, one entry each: "restart" (the engine restarts, then
        takes the push), "restart-fail" (restarts, the push is lost: TransientError), "lose"
        (the push lands, its answer is lost: TransientError), "" (nothing)."""

    def restart(self) -> None:
        self.engine = PolicyEngine(self.model)

    def push_weights(
        self, tensors: Mapping[str, torch.Tensor], version: int, full: object = None
    ) -> Pushed:
        todo = self.before_push.pop(0) if self.before_push else ""
        if todo.startswith("restart"):
            self.restart()
        if todo == "restart-fail":
            raise TransientError("UpdateWeights on local failed: UNAVAILABLE: restarting", "x")
        pushed = super().push_weights(tensors, version)
        self.pushes.append((version, len(tensors)))
        if todo == "lose":
            raise TransientError("UpdateWeights on local failed: UNAVAILABLE: reset", "x")
        return pushed


def _run(config: TrainConfig, policy: LocalPolicy, on_step=None, resume=False) -> TrainingLoop:  # noqa: ANN001
    loop = TrainingLoop(config, policy, _vader_mixer(), resume=resume)
    loop.run(on_step=on_step)
    return loop


def _same_parameters(a: TrainingLoop, b: TrainingLoop) -> bool:
    left, right = a.model.trainable_state_dict(), b.model.trainable_state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _serves_the_learner(loop: TrainingLoop, policy: LocalPolicy) -> bool:
    served = policy.engine.model.state_dict()
    learner = loop.model.policy_state_dict_for_serving()
    return all(torch.equal(served[k], v) for k, v in learner.items())


def _versions(folder: Path) -> list[int]:
    return [int(row["weight_version"]) for row in read_metrics(folder / "metrics.jsonl")]


@pytest.mark.parametrize("lora", [False, True])
def test_a_restart_between_steps_is_repushed_and_regenerated(
    tiny_lm: Path, tmp_path: Path, lora: bool
) -> None:
    """The policy restarts after steps 1 and 2: step 2's and 3's first Generate come from base
    weights; the trainer pushes its weights again (same version: the same weights) and
    generates again with the same seed, so the run equals the uninterrupted one bit for bit."""
    straight = _run(_config(tiny_lm, tmp_path, 3, "straight", lora), LocalPolicy(str(tiny_lm)))
    policy = RestartablePolicy(str(tiny_lm))
    retries: list[int] = []
    instances: list[str] = []

    def restart(result: object) -> None:
        instances.append(policy.engine.instance_id)
        if len(instances) < 3:
            policy.restart()

    loop = TrainingLoop(_config(tiny_lm, tmp_path, 3, "restarted", lora), policy, _vader_mixer())
    loop.progress.listeners.append(lambda p: retries.append(p.retries))
    loop.run(on_step=restart)
    assert _same_parameters(straight, loop)
    assert _versions(tmp_path / "restarted") == _versions(tmp_path / "straight") == [1, 2, 3]
    assert len(set(instances)) == 3 and _serves_the_learner(loop, policy)
    # The re-pushes carried every tensor, under the versions the old instance served.
    full = len(loop.model.policy_state_dict_for_serving())
    assert [version for version, _ in policy.pushes] == [1, 1, 2, 2, 3]
    assert policy.pushes[1] == (1, full) and policy.pushes[3] == (2, full)
    assert max(retries) >= 1  # counted in the progress retries
    assert read_high_water(tmp_path / "restarted") == 3


def test_a_restart_while_the_served_weights_lag(tiny_lm: Path, tmp_path: Path) -> None:
    """sync_every=2, pushes after steps 2 and 4. A restart after step 1: the new instance
    serves base weights, which are the run's version 0: nothing to push. A restart after step
    3: version 1 is gone and the learner has moved past it, so its weights go out under a new
    number (2), never under an old one."""
    config = _config(tiny_lm, tmp_path, 4, "lagging")
    config.run.sync_every = 2
    policy = RestartablePolicy(str(tiny_lm))
    loop = _run(config, policy, on_step=lambda r: policy.restart() if r.step in (1, 3) else None)
    assert [version for version, _ in policy.pushes] == [1, 2, 3]
    assert _versions(tmp_path / "lagging") == [0, 1, 1, 3] and _serves_the_learner(loop, policy)


def test_a_restart_that_breaks_a_push_gets_the_full_weights(tiny_lm: Path, tmp_path: Path) -> None:
    """LoRA syncs only the adapted layers. The service restarts under step 2's push (the push
    is lost): the retry sees the new instance and sends every tensor, so what it serves does
    not depend on what the new instance loaded."""
    straight = _run(_config(tiny_lm, tmp_path, 3, "straight", True), LocalPolicy(str(tiny_lm)))
    policy = RestartablePolicy(str(tiny_lm))
    policy.before_push = ["", "restart-fail"]
    loop = _run(_config(tiny_lm, tmp_path, 3, "restarted", True), policy)
    full = len(loop.model.policy_state_dict_for_serving())
    partial = len(loop.model.policy_state_dict_for_serving(trained_only=True))
    assert partial < full
    assert policy.pushes == [(1, partial), (2, full), (3, partial)]
    assert _same_parameters(straight, loop) and _serves_the_learner(loop, policy)
    assert _versions(tmp_path / "restarted") == [1, 2, 3]


def test_a_partial_push_answered_by_a_new_instance_is_followed_by_a_full_one(
    tiny_lm: Path, tmp_path: Path
) -> None:
    """The service restarts between the trainer's last look and step 2's push: the partial
    push lands on the new instance (base weights + adapted layers as version 2), whose answer
    names another instance; the trainer pushes everything as version 3."""
    policy = RestartablePolicy(str(tiny_lm))
    policy.before_push = ["", "restart"]
    loop = _run(_config(tiny_lm, tmp_path, 3, "restarted", True), policy)
    full = len(loop.model.policy_state_dict_for_serving())
    partial = len(loop.model.policy_state_dict_for_serving(trained_only=True))
    assert policy.pushes == [(1, partial), (2, partial), (3, full), (4, partial)]
    assert _versions(tmp_path / "restarted") == [1, 3, 4] and _serves_the_learner(loop, policy)


def test_a_push_whose_answer_was_lost_is_not_sent_twice(tiny_lm: Path, tmp_path: Path) -> None:
    policy = RestartablePolicy(str(tiny_lm))
    policy.before_push = ["lose"]
    loop = _run(_config(tiny_lm, tmp_path, 2, "lost", True), policy)
    assert [version for version, _ in policy.pushes] == [1, 2]
    assert _versions(tmp_path / "lost") == [1, 2] and _serves_the_learner(loop, policy)


def test_another_writer_is_the_same_instance_at_a_higher_version(
    tiny_lm: Path, tmp_path: Path
) -> None:
    policy = RestartablePolicy(str(tiny_lm))
    loop = TrainingLoop(_config(tiny_lm, tmp_path, 3, "writer"), policy, _vader_mixer())
    loop.run_step()
    weights = {k: v.clone() for k, v in policy.engine.model.state_dict().items()}
    policy.engine.apply_weights(weights, 7)  # somebody else's push
    with pytest.raises(StepFailed, match="serves weight version 7, expected 1, .*another writer"):
        loop.run_step()
    assert loop.step == 1


def test_a_policy_that_keeps_restarting_fails_the_step_naming_it(
    tiny_lm: Path, tmp_path: Path
) -> None:
    """Every Generate comes from a new instance: after run.step_retries re-pushes the step
    fails, naming the service, instead of training on samples from unknown weights."""
    policy = RestartablePolicy(str(tiny_lm))
    real = policy.generate

    def restarting_generate(prompts, gen, seed):  # noqa: ANN001, ANN202
        policy.restart()
        return real(prompts, gen, seed)

    loop = TrainingLoop(_config(tiny_lm, tmp_path, 2, "flapping"), policy, _vader_mixer())
    loop.run_step()
    policy.generate = restarting_generate  # type: ignore[method-assign]
    with pytest.raises(StepFailed, match="at local still did not serve this run's weights"):
        loop.run_step()
    assert loop.step == 1


def test_versions_strictly_increase_across_a_resume(tiny_lm: Path, tmp_path: Path) -> None:
    """Steps 3 and 4 ran and pushed versions 3 and 4, but the trainer died before their
    checkpoint; the policy restarted too. The resumed run redoes them as versions above 4 (the
    high-water file), and ends with the uninterrupted run's parameters."""
    straight = _run(_config(tiny_lm, tmp_path, 4, "straight"), LocalPolicy(str(tiny_lm)))
    config = _config(tiny_lm, tmp_path, 4, "resumed")
    config.run.save_every = 2
    config.run.keep_checkpoints = 3
    first = _run(config, LocalPolicy(str(tiny_lm)))
    shutil.rmtree(first.checkpoints / "step-000004")  # as if killed before writing it
    (first.checkpoints / "latest").write_text("step-000002\n")
    assert read_high_water(tmp_path / "resumed") == 4
    resumed = _run(_config(tiny_lm, tmp_path, 4, "resumed"), LocalPolicy(str(tiny_lm)), resume=True)
    assert _versions(tmp_path / "resumed") == [1, 2, 6, 7]
    assert resumed.weight_version == 7 == read_high_water(tmp_path / "resumed")
    assert _same_parameters(straight, resumed)


def test_the_high_water_file(tmp_path: Path) -> None:
    assert read_high_water(tmp_path) == 0
    write_high_water(tmp_path, 12)
    assert read_high_water(tmp_path) == 12 and (tmp_path / HIGH_WATER_FILE).read_text() == "12\n"
    assert [p.name for p in tmp_path.iterdir()] == [HIGH_WATER_FILE]  # no temporary left
    (tmp_path / HIGH_WATER_FILE).write_text("twelve")
    with pytest.raises(ValueError, match="expected a weight version"):
        read_high_water(tmp_path)


def test_every_answer_names_the_instance_and_a_restart_changes_it(tiny_lm: Path) -> None:
    """GetInfo, Generate and UpdateWeights answers (read through GrpcPolicy) carry the id."""
    seen = []
    gen = _config(tiny_lm, Path("unused"), 1, "x").generation
    for _ in range(2):  # two starts of the service
        engine = PolicyEngine(str(tiny_lm))
        service = build_server("policy", servicers(PolicyServicer(engine)), open_config())
        policy = GrpcPolicy(f"127.0.0.1:{service.port}")
        try:
            info = policy.facts()
            generated = policy.generate(["hi"], gen, seed=1)
            weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
            pushed = policy.push_weights(weights, 1)
        finally:
            policy.close()
            service.stop(grace_s=0)
        assert len(info.instance_id) == 32 and info.instance_id == engine.instance_id
        assert info.instance_id == generated.instance_id == pushed.instance_id
        seen.append(info.instance_id)
    assert seen[0] != seen[1]


@pytest.mark.slow
def test_a_policy_process_killed_and_restarted_between_steps(tiny_lm: Path, tmp_path: Path) -> None:
    """A real policy service process, SIGKILLed after step 1 and started again on its port:
    step 2 finds a new instance serving base weights, re-pushes and regenerates, and the run
    ends with the parameters of an uninterrupted run against the same kind of process."""
    args = ["policy", "serve", "--model", str(tiny_lm), NO_AUTH_FLAG]
    logs = tmp_path / "logs"
    service = start_service("policy", args, logs)
    port = int(service.address.rsplit(":", 1)[1])
    restarted: list[ServiceProcess] = []

    def config(run_id: str) -> TrainConfig:
        config = _config(tiny_lm, tmp_path, 3, run_id)
        config.run.step_retries = 8  # the channel reconnects with backoff after the restart
        config.run.retry_backoff_s = 0.25
        return config

    def kill_and_restart(result: object) -> None:
        if restarted:
            return
        service.process.kill()
        service.process.wait()
        restarted.append(start_service("policy", args, logs, port=port))

    policy = GrpcPolicy(service.address)
    try:
        straight = _run(config("straight"), policy)
        first_instance = policy.facts(fresh=True).instance_id
        loop = _run(config("restarted"), policy, on_step=kill_and_restart)
        assert restarted and policy.facts(fresh=True).instance_id != first_instance
    finally:
        policy.close()
        for process in [service, *restarted]:
            process.stop(timeout_s=5)
    assert _same_parameters(straight, loop)
    # Above the straight run's 3 (the service's version when it began), never reused.
    versions = _versions(tmp_path / "restarted")
    assert versions == sorted(set(versions)) and versions[0] > 3 and len(versions) == 3
