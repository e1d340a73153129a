"""run.max_staleness (issue #14): at 0 the loop is today's lock-step loop bit for bit; at 1 a
rollout worker generates and scores step t from the weights of step t-2 while the learner
trains step t-1, every sample says which version produced it and is never more than one
version old, a resume is exact (the prefetched sample travels in the checkpoint), a swap
names the step it really applies from, a worker's failure fails the run at a step boundary,
and a policy restart under the worker is repaired."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.local_transports import LocalPolicy, LocalReward
from rlhf.server import GrpcService
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.reward.backends.vader import VaderBackend
from services.trainer.api.client import TrainerClient
from services.trainer.api.records import read_record
from services.trainer.api.service import TrainerServicer, Transports
from services.trainer.config import GenerationConfig, TrainConfig, TrainerServiceConfig
from services.trainer.orchestrator.checkpoint import latest_checkpoint
from services.trainer.orchestrator.data import PromptSampler, load_prompts
from services.trainer.orchestrator.drift import logprob_drift
from services.trainer.orchestrator.loop import StepFailed, TrainingLoop
from services.trainer.orchestrator.metrics import read_metrics
from services.trainer.orchestrator.peers import Rollout
from services.trainer.orchestrator.samples import mean_std
from services.trainer.orchestrator.trainer_state import read_state, read_summary
from tests.fuzz_requests import start_request
from tests.servers import open_config
from tests.test_policy_restart import RestartablePolicy
from tests.test_trainer_loop import FailingPolicy, _config, _vader_mixer

TIMED = ("time/", "timeline/")
"""Statistics that measure the clock, not the run: left out of every equality."""


def _k(config: TrainConfig, k: int) -> TrainConfig:
    config.run.max_staleness = k
    return config


def _stats(folder: Path, skip: tuple[str, ...] = ()) -> list[dict[str, float]]:
    rows = read_metrics(folder / "metrics.jsonl")
    return [
        {k: v for k, v in row.items() if not k.startswith(TIMED) and k not in ("time", *skip)}
        for row in rows
    ]


class SlowPolicy(LocalPolicy):
    """LocalPolicy whose Generate takes at least `pause` seconds, as a real one would."""

    def __init__(self, model: str, pause: float) -> None:
        super().__init__(model)
        self.pause = pause

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        time.sleep(self.pause)
        return super().generate(prompts, gen, seed)


def _lock_step_reference(config: TrainConfig, tiny_lm: Path) -> tuple[Any, list[dict]]:
    """Today's lock-step loop, written out: draw, Generate, Score, prepare, update, push."""
    from services.trainer.learner.ppo_trainer import PPOTrainer
    from services.trainer.learner.value_head import PolicyWithValueHead

    ppo, run = config.ppo, config.run
    policy, mixer = LocalPolicy(str(tiny_lm)), _vader_mixer()
    model = PolicyWithValueHead.from_config(ppo)
    trainer = PPOTrainer(ppo, model, model.tokenizer)
    sampler = PromptSampler(load_prompts(run.prompts), seed=ppo.seed)
    rows = []
    for step in range(1, run.steps + 1):
        prompts = sampler.next_batch(ppo.batch_size)
        rollout = policy.generate(prompts, config.generation, seed=ppo.seed * 100_003 + step)
        scores, per_source = mixer.score(prompts, rollout.response_texts)
        queries = [torch.tensor(q) for q in rollout.query_ids]
        responses = [torch.tensor(r) for r in rollout.response_ids]
        batch = trainer.prepare(queries, responses, torch.tensor(scores))
        stats = trainer.update(batch)
        stats.update(logprob_drift(rollout.response_logprobs, batch.logprobs, batch.mask))
        policy.push_weights(model.policy_state_dict_for_serving(trained_only=True), step)
        stats["env/reward_mean"], stats["env/reward_std"] = mean_std(scores)
        for name, values in per_source.items():
            stats[f"env/reward/{name}"] = mean_std(values)[0]
        lengths = [len(r) for r in rollout.response_ids]
        stats["env/response_length"] = sum(lengths) / len(lengths)
        stats["weight_version"] = float(step)
        stats["rollout/weight_version"] = float(rollout.weight_version)
        stats["rollout/staleness"] = 0.0
        rows.append({"step": step, **{k: v for k, v in stats.items() if not k.startswith(TIMED)}})
    return trainer, rows


def _same_state(a: Any, b: Any, where: str = "") -> None:
    """Every tensor equal (torch.equal), every other value equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_staleness_0_is_the_lock_step_loop(tiny_lm: Path, tmp_path: Path) -> None:
    config = _k(_config(tiny_lm, tmp_path, 3, "k0"), 0)
    loop = TrainingLoop(config, LocalPolicy(str(tiny_lm)), _vader_mixer())
    loop.run()
    reference, rows = _lock_step_reference(_config(tiny_lm, tmp_path, 3, "ref"), tiny_lm)
    assert _stats(tmp_path / "k0") == rows
    _same_state(loop.trainer.state_dict(), reference.state_dict())
    for row in read_metrics(tmp_path / "k0" / "metrics.jsonl"):
        assert row["time/overlap"] == 0.0  # lock-step: the rollout never meets the update
        assert row["timeline/score_end"] <= row["timeline/train_start"]
        assert row["timeline/train_end"] <= row["timeline/sync_start"]


def test_staleness_1_trains_on_samples_one_version_old_and_overlaps(
    tiny_lm: Path, tmp_path: Path
) -> None:
    config = _k(_config(tiny_lm, tmp_path, 4, "k1"), 1)
    TrainingLoop(config, SlowPolicy(str(tiny_lm), 0.2), _vader_mixer()).run()
    rows = read_metrics(tmp_path / "k1" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    learner = 0.0  # the learner's version while it trains a step: the last one pushed
    for row in rows:
        sampled = row["rollout/weight_version"]
        assert row["rollout/staleness"] == learner - sampled == (0 if row["step"] == 1 else 1)
        learner = row["weight_version"]
    for before, row in zip(rows, rows[1:]):
        # Step t's Generate ran while step t-1 trained (the policy takes 0.2 s a batch).
        start = max(row["timeline/generate_start"], before["timeline/train_start"])
        end = min(row["timeline/generate_end"], before["timeline/train_end"])
        assert start < end, row["step"]
        assert row["time/overlap"] >= end - start > 0


def test_exact_resume_at_staleness_1(tiny_lm: Path, tmp_path: Path) -> None:
    """Stopped after step 2 (the sample of step 3, made from the weights of step 1, goes into
    the checkpoint), resumed to step 4: the same parameters, optimizer, RNGs and statistics
    as a run never stopped."""
    TrainingLoop(
        _k(_config(tiny_lm, tmp_path, 4, "straight"), 1), LocalPolicy(str(tiny_lm)), _vader_mixer()
    ).run()
    stop = threading.Event()
    first = TrainingLoop(
        _k(_config(tiny_lm, tmp_path, 4, "cut"), 1), LocalPolicy(str(tiny_lm)), _vader_mixer()
    )
    assert first.run(stop, on_step=lambda r: stop.set() if r.step == 2 else None) == "stopped"
    cut = latest_checkpoint(first.checkpoints)
    assert cut is not None and cut.name == "step-000002"
    pending = read_state(cut)["pending"]
    assert [p["step"] for p in pending] == [3] and read_summary(cut)["scored_through"] == 3
    resumed = TrainingLoop(
        _k(_config(tiny_lm, tmp_path, 4, "cut"), 1),
        LocalPolicy(str(tiny_lm)),
        _vader_mixer(),
        resume=True,
    )
    resumed.run()
    straight_state = read_state(tmp_path / "straight" / "checkpoints" / "step-000004")
    resumed_state = read_state(tmp_path / "cut" / "checkpoints" / "step-000004")
    _same_state(straight_state["trainer"], resumed_state["trainer"], "trainer")
    assert straight_state["sampler"] == resumed_state["sampler"]
    # Versions are renumbered by the resume (never reused); everything else is the same.
    versions = ("weight_version", "rollout/weight_version")
    assert _stats(tmp_path / "cut", versions) == _stats(tmp_path / "straight", versions)


class GatedPolicy(LocalPolicy):
    """LocalPolicy whose Generate number `gate_at` waits for `release`, `at_gate` set."""

    def __init__(self, model: str, gate_at: int) -> None:
        super().__init__(model)
        self.calls, self.gate_at = 0, gate_at
        self.at_gate, self.release = threading.Event(), threading.Event()

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        self.calls += 1
        if self.calls == self.gate_at:
            self.at_gate.set()
            assert self.release.wait(60), "the test never released the gate"
        return super().generate(prompts, gen, seed)


@pytest.fixture
def gated(tiny_lm: Path) -> GatedPolicy:
    return GatedPolicy(str(tiny_lm), gate_at=4)


@pytest.fixture
def trainer(gated: GatedPolicy, tmp_path: Path, tiny_lm: Path) -> Iterator[TrainerClient]:
    def reward(address: str, limits: object) -> LocalReward:
        return LocalReward(VaderBackend(), address=address)

    servicer = TrainerServicer(
        TrainerServiceConfig(
            policy="local:1",
            reward=["a@local:2"],
            allowed_endpoints=["local:3"],
            output_dir=str(tmp_path),
            model_root=[str(tiny_lm)],
        ),
        Transports(policy=lambda address, limits: gated, reward=reward),
    )
    service = GrpcService("trainer", open_config(grace_s=0))
    service.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, "trainer")
    client = TrainerClient(f"127.0.0.1:{service.start()}")
    service.set_serving()
    yield client
    gated.release.set()
    client.close()
    for run in servicer.runs.values():
        if run.thread is not None:
            run.thread.join(60)
    service.stop(grace_s=0)


def test_a_swap_names_the_first_step_not_yet_scored(
    trainer: TrainerClient, gated: GatedPolicy, tiny_lm: Path, tmp_path: Path
) -> None:
    """Staleness 1: step 4's Generate (from the weights of step 2) is held while step 3 has
    trained and waits to push: the learner's last finished step is 2, but step 3 was scored
    already, so a swap then applies from step 4, and says so, in the reply and the journal."""
    request = start_request(str(tiny_lm), "swap", 5)
    request.overrides["run.max_staleness"] = "1"
    trainer.start(request)
    assert gated.at_gate.wait(60), "step 4 never reached Generate"
    assert trainer.get("swap").step == 2  # step 3 pushes only once step 4's Generate returned
    reply = trainer.swap("swap", ["b@local:3"])
    assert reply.effective_from_step == 4
    gated.release.set()
    end = [m for m in trainer.watch("swap", from_step=1)][-1]
    assert end.state == trainer_pb2.RUN_STATE_COMPLETED, end.error
    rows = read_metrics(tmp_path / "swap" / "metrics.jsonl")
    sources = [sorted(k for k in row if k.startswith("env/reward/")) for row in rows]
    assert sources == [["env/reward/a"]] * 3 + [["env/reward/b"]] * 2
    assert [s.from_step for s in read_record(tmp_path / "swap").swaps] == [4]


def test_a_worker_failure_fails_the_run_at_a_step_boundary(tiny_lm: Path, tmp_path: Path) -> None:
    """Step 3's Generate fails while step 2 trains: step 2 finishes and is checkpointed, step
    3 fails when the loop takes its sample, and the sampler goes back before its prompts."""
    config = _k(_config(tiny_lm, tmp_path, 4, "failing"), 1)
    loop = TrainingLoop(config, FailingPolicy(str(tiny_lm), "generate", 3), _vader_mixer())
    with pytest.raises(StepFailed, match="step 3: Generate on local failed: INTERNAL: injected"):
        loop.run()
    assert loop.step == 2
    assert [row["step"] for row in read_metrics(tmp_path / "failing" / "metrics.jsonl")] == [1, 2]
    two_batches = PromptSampler(load_prompts("builtin"), seed=config.ppo.seed)
    two_batches.next_batch(4)
    two_batches.next_batch(4)
    assert loop.sampler.state_dict() == two_batches.state_dict()
    state = read_state(tmp_path / "failing" / "checkpoints" / "step-000002")
    assert state["pending"] == [] and state["sampler"] == two_batches.state_dict()


def test_a_policy_restart_under_the_worker_is_repaired(tiny_lm: Path, tmp_path: Path) -> None:
    """The policy restarts after step 2 (base weights, version 0, a new instance): the
    worker's Generate of step 4 (meant to use the weights of step 2) is refused; once step 3
    has trained, the loop pushes the learner's weights in full as version 3 (the weights of
    step 2 are gone from the learner), step 4 is generated again from them (staleness 0,
    within the bound), and the run goes on with partial LoRA pushes."""
    policy = RestartablePolicy(str(tiny_lm))
    config = _k(_config(tiny_lm, tmp_path, 5, "restart", lora=True), 1)
    loop = TrainingLoop(config, policy, _vader_mixer())
    loop.run(on_step=lambda r: policy.restart() if r.step == 2 else None)
    full = len(loop.model.policy_state_dict_for_serving())
    partial = len(loop.model.policy_state_dict_for_serving(trained_only=True))
    assert partial < full
    assert policy.pushes == [(1, partial), (2, partial), (3, full), (4, partial), (5, partial)]
    rows = read_metrics(tmp_path / "restart" / "metrics.jsonl")
    assert [row["rollout/weight_version"] for row in rows] == [0, 0, 1, 3, 3]
    assert [row["rollout/staleness"] for row in rows] == [0, 1, 1, 0, 1]
    served = policy.engine.model.state_dict()
    learner = loop.model.policy_state_dict_for_serving()
    assert all(torch.equal(served[k], v) for k, v in learner.items())
