"""A trainer that restarts knows its runs (issue #13, items 3 and 4): run.json in each run folder,
runs found on start (INTERRUPTED when they were active), resume through the API with the saved
config, --resume-interrupted, WatchRun replay from metrics.jsonl, and resume restoring what was
in force at the checkpoint (reward endpoints and the swaps after it, KL controller, sampler).

A trainer "killed" mid-run is simulated by copying its output root while its run waits inside a
Generate (the disk as a SIGKILL would leave it) and starting a second trainer on the copy; the
first run is then failed and joined, so nothing writes into the copy but the second trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.local_transports import LocalPolicy, LocalReward
from rlhf.cli import main
from rlhf.config import from_args
from rlhf.server import build_server
from rlhf.v1 import trainer_pb2
from services.reward.backends.vader import VaderBackend
from services.trainer import cli as trainer_cli
from services.trainer.api import commands, watching
from services.trainer.api import service as service_module
from services.trainer.api.client import TrainerClient, TrainerError
from services.trainer.api.records import MAX_RECORD_BYTES, RECORD, RunRecord, write_record
from services.trainer.api.service import TrainerServicer, Transports, servicers
from services.trainer.config import GenerationConfig, TrainerServiceConfig, load_train_config
from services.trainer.orchestrator.loop import TrainingLoop
from services.trainer.orchestrator.metrics import MetricsLog, read_metrics
from services.trainer.orchestrator.peers import Rollout, TransientError
from services.trainer.orchestrator.resume import Swap, journal_swap
from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer
from tests.fuzz_requests import start_request
from tests.servers import open_config

State = trainer_pb2.RunState
STEP, END = trainer_pb2.WATCH_EVENT_STEP, trainer_pb2.WATCH_EVENT_END
DEAD = "local:9"
"""A reward address whose source fails every call (its probe included)."""


class HeldPolicy(LocalPolicy):
    """A policy whose Generate number k (1-based, counted across the run) waits in `hold(k)`
    until released; `killed` makes a released Generate raise (the run then fails)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.calls = 0
        self.held: dict[int, tuple[threading.Event, threading.Event]] = {}
        self.killed = False

    def hold(self, call: int) -> threading.Event:
        """Returns the event set when Generate number `call` is waiting."""
        self.held[call] = (threading.Event(), threading.Event())
        return self.held[call][0]

    def release(self, call: int) -> None:
        self.held[call][1].set()

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        self.calls += 1
        if self.calls in self.held:
            reached, released = self.held[self.calls]
            reached.set()
            assert released.wait(60), "the test never released the Generate"
        if self.killed:
            raise RuntimeError("the trainer was killed")
        return super().generate(prompts, gen, seed)


class DeadReward(LocalReward):
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise RuntimeError("no reward service answers here")


class LateReward(LocalReward):
    """Unreachable (a transient error, as over gRPC) until `up` is set; counts the attempts."""

    up = threading.Event()
    attempts = 0

    def name(self) -> str:
        LateReward.attempts += 1
        if not self.up.is_set():
            raise TransientError(f"GetInfo on {self.address} failed: UNAVAILABLE", self.address)
        return super().name()


@dataclass
class Trainer:
    servicer: TrainerServicer
    client: TrainerClient
    policy: HeldPolicy


@contextmanager
def trainer(
    root: Path,
    tiny_lm: Path,
    port: int = 0,
    holds: tuple[int, ...] = (),
    late_rewards: bool = False,
    **settings: object,
) -> Iterator[Trainer]:
    """A trainer service on `port` (0: any) over `root`, with in-process transports (its own
    policy, whose Generate calls `holds` wait from the start; with `late_rewards` every reward
    endpoint is a LateReward). On exit the server stops first (streams break, as when a
    trainer dies), then its runs are failed and joined."""
    policy = HeldPolicy(str(tiny_lm))
    for call in holds:
        policy.hold(call)
    transports = Transports(
        policy=lambda address, limits: policy,
        reward=lambda address, limits: (
            LateReward if late_rewards else DeadReward if address == DEAD else LocalReward
        )(VaderBackend(), address=address),
    )
    config = TrainerServiceConfig(
        policy="local:1", reward=["a@local:2"], output_dir=str(root), model_root=[str(tiny_lm)],
        allowed_endpoints=["local:*"], **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    servicer = TrainerServicer(config, transports)
    service = build_server("trainer", servicers(servicer), open_config(grace_s=0, port=port))
    client = TrainerClient(f"127.0.0.1:{service.port}")
    try:
        yield Trainer(servicer, client, policy)
    finally:
        service.stop(grace_s=0)
        policy.killed = True
        for _, released in policy.held.values():
            released.set()
        client.close()
        for run in servicer.runs.values():  # no run thread outlives its trainer
            if run.thread is not None:
                run.thread.join(60)


def _request(tiny_lm: Path, run_id: str, steps: int, save_every: int = 0) -> object:
    request = start_request(str(tiny_lm), run_id, steps)
    request.overrides["run.save_every"] = str(save_every)
    return request


def _watch(client: TrainerClient, run_id: str) -> list[trainer_pb2.StepMetrics]:
    return [m for m in client.watch(run_id, from_step=1) if m.event in (STEP, END)]


def _rows(root: Path, run_id: str) -> list[dict[str, float]]:
    return read_metrics(root / run_id / "metrics.jsonl")


def _killed_at(tmp: Path, tiny_lm: Path, steps: int, cut: int, swaps: dict[int, str]) -> Path:
    """The output root of run "cut" (save_every 2) as a kill during step `cut`'s Generate left
    it; `swaps`: {step: endpoint} swapped while that step waits in Generate (from the next)."""
    first, copy = tmp / "first", tmp / "copy"
    with trainer(first, tiny_lm) as t:
        waits = {k: t.policy.hold(k) for k in {*swaps, cut}}
        t.client.start(_request(tiny_lm, "cut", steps, save_every=2))
        for step in sorted(waits):
            assert waits[step].wait(60), f"step {step} never reached Generate"
            if step == cut:
                shutil.copytree(first, copy)
            else:
                reply = t.client.swap("cut", [swaps[step]])
                assert reply.effective_from_step == step + 1
                t.policy.release(step)
    record = json.loads((copy / "cut" / RECORD).read_text())
    assert record["state"] == "RUN_STATE_RUNNING"
    return copy


def test_a_finished_run_is_listed_after_a_restart_and_replays(tmp_path: Path, tiny_lm: Path):
    with trainer(tmp_path, tiny_lm) as t:
        t.client.start(_request(tiny_lm, "done", 2))
        assert _watch(t.client, "done")[-1].state == State.RUN_STATE_COMPLETED
        # A finished run keeps listing its endpoints (its mixer is closed).
        assert [(r.name, r.address) for r in t.client.get("done").rewards] == [("a", "local:2")]
    rows = _rows(tmp_path, "done")
    assert [r["step"] for r in rows] == [1, 2] and all(r["time"] > 0 for r in rows)

    with trainer(tmp_path, tiny_lm) as again:
        status = again.client.get("")  # the most recent run found on disk
        assert status.run_id == "done" and status.state == State.RUN_STATE_COMPLETED
        assert (status.step, status.total_steps) == (2, 2)
        assert status.weight_version == rows[-1]["weight_version"] > 0
        assert [(r.name, r.address, r.weight) for r in status.rewards] == [("a", "local:2", 1.0)]
        assert status.last_metrics["env/reward_mean"] == rows[-1]["env/reward_mean"]
        assert "time" not in status.last_metrics
        assert status.checkpoint_dir == str(tmp_path / "done" / "checkpoints")
        replay = _watch(again.client, "done")
        assert [(m.event, m.step) for m in replay] == [(STEP, 1), (STEP, 2), (END, 2)]
        for message, row in zip(replay, rows, strict=False):
            assert message.timestamp == row["time"]
            assert message.weight_version == row["weight_version"]
            assert dict(message.metrics) == {
                k: v for k, v in row.items() if k not in ("step", "time")
            }


def test_an_interrupted_run_is_listed_and_resumed_through_the_api(
    tmp_path: Path, tiny_lm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _killed_at(tmp_path, tiny_lm, steps=4, cut=3, swaps={})
    rows = _rows(root, "cut")
    assert [r["step"] for r in rows] == [1, 2]
    with trainer(root, tiny_lm) as t:
        status = t.client.get("cut")
        assert status.state == State.RUN_STATE_INTERRUPTED
        assert (status.step, status.total_steps) == (2, 4)  # its checkpoint's step
        assert status.weight_version == rows[-1]["weight_version"]
        assert status.last_metrics["objective/kl"] == rows[-1]["objective/kl"]
        replay = _watch(t.client, "cut")
        assert [(m.event, m.step) for m in replay] == [(STEP, 1), (STEP, 2), (END, 2)]
        assert replay[-1].state == State.RUN_STATE_INTERRUPTED
        assert main(["status", "--trainer", t.client.address, "--run-id", "cut"]) == 0
        out = capsys.readouterr().out
        assert "INTERRUPTED" in out and "--run-id cut --resume" in out
        assert main(["watch", "--trainer", t.client.address, "--run-id", "cut"]) == 1
        assert "--resume" in capsys.readouterr().err

        # Resume with an empty config: the run's saved config; more steps through an override.
        request = trainer_pb2.StartRunRequest(run_id="cut", resume=True)
        request.overrides["run.steps"] = "5"
        resumed = t.client.start(request)
        assert resumed.total_steps == 5 and resumed.step == 2
        messages = _watch(t.client, "cut")
        assert [m.step for m in messages if m.event == STEP] == [1, 2, 3, 4, 5]
        assert messages[-1].state == State.RUN_STATE_COMPLETED, messages[-1].error
        assert t.servicer.runs["cut"].thread is not None  # the new Run replaced the found one
    assert [r["step"] for r in _rows(root, "cut")] == [1, 2, 3, 4, 5]  # each step once
    record = json.loads((root / "cut" / RECORD).read_text())
    assert record["state"] == "RUN_STATE_COMPLETED" and record["total_steps"] == 5
    assert record["config"]["run"]["steps"] == 5 and record["rewards"] == ["a@local:2=1"]

    with trainer(root, tiny_lm) as t:  # a COMPLETED run resumes only for more steps
        with pytest.raises(TrainerError) as refused:
            t.client.start(trainer_pb2.StartRunRequest(run_id="cut", resume=True))
        assert refused.value.code == "FAILED_PRECONDITION" and "more steps" in refused.value.details


def test_resume_interrupted_resumes_the_latest_by_itself(tmp_path: Path, tiny_lm: Path) -> None:
    root = _killed_at(tmp_path, tiny_lm, steps=3, cut=3, swaps={})
    older = RunRecord("older", "RUN_STATE_RUNNING", 3, "local:1", ["a@local:2=1"], {}, updated=1.0)
    write_record(root / "older", older)
    with trainer(root, tiny_lm, resume_interrupted=True) as t:
        messages = _watch(t.client, "cut")
        assert messages[-1].state == State.RUN_STATE_COMPLETED, messages[-1].error
        assert [m.step for m in messages if m.event == STEP] == [1, 2, 3]
        assert t.client.get("older").state == State.RUN_STATE_INTERRUPTED  # one at a time


def test_resume_interrupted_waits_for_a_reward_service_that_is_not_up_yet(
    tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Services restarting together: the trainer is back before its reward service. The resume
    is refused UNAVAILABLE (a caller may try again) and the trainer tries again by itself
    until the endpoint answers; then the run resumes and completes."""
    monkeypatch.setattr(service_module, "RESUME_RETRY_S", 0.1)
    root = _killed_at(tmp_path, tiny_lm, steps=3, cut=3, swaps={})
    LateReward.up.clear()
    LateReward.attempts = 0
    with trainer(root, tiny_lm, late_rewards=True, resume_interrupted=True) as t:
        assert t.client.get("cut").state == State.RUN_STATE_INTERRUPTED
        with pytest.raises(TrainerError) as refused:
            t.client.start(trainer_pb2.StartRunRequest(run_id="cut", resume=True))
        assert refused.value.code == "UNAVAILABLE" and "local:2" in refused.value.details
        for _ in range(300):  # the trainer keeps trying in the background
            if LateReward.attempts >= 4:
                break
            time.sleep(0.05)
        assert LateReward.attempts >= 4
        LateReward.up.set()
        for _ in range(600):
            if t.client.get("cut").state == State.RUN_STATE_COMPLETED:
                break
            time.sleep(0.05)
        assert t.client.get("cut").state == State.RUN_STATE_COMPLETED
    assert [r["step"] for r in _rows(root, "cut")] == [1, 2, 3]


def test_resume_restores_swapped_endpoints_and_reapplies_later_swaps(
    tmp_path: Path, tiny_lm: Path
) -> None:
    # b from step 3 (swapped during step 2, before the checkpoint of step 2); c from step 4
    # (swapped during step 3, after it); killed during step 4.
    root = _killed_at(tmp_path, tiny_lm, 5, cut=4, swaps={2: "b@local:3", 3: "c@local:4"})
    record = json.loads((root / "cut" / RECORD).read_text())
    assert record["swaps"] == [
        {"from_step": 3, "rewards": ["b@local:3=1"]},
        {"from_step": 4, "rewards": ["c@local:4=1"]},
    ]
    # `rlhf train --resume` in one process plans the same (the checkpoint's, then the swap).
    local = load_train_config(None, [f"run.output_dir={root}", "run.run_id=cut"])
    plan = commands._resume_plan(local, caller=[])  # noqa: SLF001
    # (b's swap applied from step 3, after the checkpoint: re-applied too, to the same end.)
    assert plan.initial == ["b@local:3=1"]
    assert plan.swaps == [Swap(3, ["b@local:3=1"]), Swap(4, ["c@local:4=1"])]
    with trainer(root, tiny_lm) as t:
        assert [r.name for r in t.client.get("cut").rewards] == ["c"]  # run.json: in force
        assert t.client.get("cut").step == 2
        t.client.start(trainer_pb2.StartRunRequest(run_id="cut", resume=True))
        assert _watch(t.client, "cut")[-1].state == State.RUN_STATE_COMPLETED
        assert [r.name for r in t.client.get("cut").rewards] == ["c"]
    sources = [sorted(k for k in r if k.startswith("env/reward/")) for r in _rows(root, "cut")]
    assert sources == [["env/reward/a"]] * 2 + [["env/reward/b"]] + [["env/reward/c"]] * 2


def test_the_callers_endpoints_win_and_are_logged(
    tmp_path: Path, tiny_lm: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _killed_at(tmp_path, tiny_lm, 4, cut=3, swaps={2: "b@local:3"})
    with trainer(root, tiny_lm) as t, caplog.at_level(logging.INFO, "rlhf.trainer.resume"):
        request = trainer_pb2.StartRunRequest(run_id="cut", resume=True)
        request.rewards.add(address="local:5", name="z")
        t.client.start(request)
        assert _watch(t.client, "cut")[-1].state == State.RUN_STATE_COMPLETED
    (line,) = [r for r in caplog.records if "caller's reward endpoints" in r.getMessage()]
    assert line.caller_rewards == ["z@local:5=1"]  # type: ignore[attr-defined]
    assert line.checkpoint_rewards == ["b@local:3=1"]  # type: ignore[attr-defined]
    sources = [sorted(k for k in r if k.startswith("env/reward/")) for r in _rows(root, "cut")]
    assert sources == [["env/reward/a"]] * 2 + [["env/reward/z"]] * 2


def test_a_journaled_endpoint_that_fails_its_probe_fails_the_resume(
    tmp_path: Path, tiny_lm: Path
) -> None:
    root = _killed_at(tmp_path, tiny_lm, 4, cut=3, swaps={})
    record = json.loads((root / "cut" / RECORD).read_text())
    record["swaps"] = [{"from_step": 4, "rewards": [f"gone@{DEAD}=1"]}]
    (root / "cut" / RECORD).write_text(json.dumps(record))
    with trainer(root, tiny_lm) as t:
        with pytest.raises(TrainerError) as refused:
            t.client.start(trainer_pb2.StartRunRequest(run_id="cut", resume=True))
        assert refused.value.code == "FAILED_PRECONDITION"
        assert DEAD in refused.value.details and "step 4" in refused.value.details
        assert t.client.get("cut").state == State.RUN_STATE_INTERRUPTED  # nothing started


def test_unreadable_run_folders_are_skipped_with_a_warning(
    tmp_path: Path, tiny_lm: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = RunRecord("good", "RUN_STATE_FAILED", 3, "local:1", ["a@local:2=1"], {}, "boom")
    write_record(tmp_path / "good", good)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RECORD).write_text("{not json")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / RECORD).write_text(" " * (MAX_RECORD_BYTES + 1))
    (tmp_path / "link").symlink_to(tmp_path / "good")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / RECORD).write_text(json.dumps({**good.to_json(), "state": "HAPPY"}))
    shutil.copytree(tmp_path / "good", tmp_path / ".hidden")  # not a run id: not looked at
    with caplog.at_level(logging.WARNING, "rlhf.trainer.records"):
        servicer = TrainerServicer(
            TrainerServiceConfig(policy="local:1", reward=["local:2"], output_dir=str(tmp_path)),
            Transports(policy=lambda a, lim: None, reward=lambda a, lim: None),  # type: ignore[arg-type,return-value]
        )
    assert sorted(servicer.runs) == ["good"]
    status = servicer.runs["good"].status()
    assert status.state == State.RUN_STATE_FAILED and status.error == "boom"
    assert [r.address for r in status.rewards] == ["local:2"]
    skipped = sorted(Path(r.path).name for r in caplog.records)  # type: ignore[attr-defined]
    assert skipped == ["bad", "big", "link", "odd"]


def test_resume_interrupted_is_a_flag_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    def parsed(argv: list[str]) -> TrainerServiceConfig:
        parser = argparse.ArgumentParser()
        trainer_cli.configure(parser)
        return from_args(TrainerServiceConfig, parser.parse_args(argv))

    assert parsed([]).resume_interrupted is False
    assert parsed(["--resume-interrupted"]).resume_interrupted is True
    monkeypatch.setenv("RLHF_RESUME_INTERRUPTED", "true")
    assert parsed([]).resume_interrupted is True


def test_resume_restores_the_kl_controller_the_sampler_and_the_optimizer(
    tmp_path: Path, tiny_lm: Path
) -> None:
    def loop(steps: int, run_id: str, resume: bool = False) -> TrainingLoop:
        overrides = [
            f"model_name={tiny_lm}", "batch_size=2", "mini_batch_size=1", "ppo_epochs=1",
            "log_with=jsonl", "max_new_tokens=4", "horizon=10", f"run.steps={steps}",
            "run.save_every=0", f"run.output_dir={tmp_path}", f"run.run_id={run_id}",
        ]  # fmt: skip
        mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
        mixer.set_endpoints([EndpointSpec("local:1")])
        config = load_train_config(None, overrides)
        return TrainingLoop(config, LocalPolicy(str(tiny_lm)), mixer, resume=resume)

    first = loop(3, "kl")
    first.run()
    kl, position = first.trainer.kl_ctl.value, first.sampler.state_dict()
    optimizer = first.trainer.optimizer.state_dict()["state"]
    fresh = loop(6, "fresh")
    assert kl != fresh.trainer.kl_ctl.value  # the controller moved (horizon 10): a real check
    assert position != fresh.sampler.state_dict()  # three batches drawn: a real check

    resumed = loop(6, "kl", resume=True)
    assert resumed.trainer.kl_ctl.value == kl
    assert resumed.sampler.state_dict() == position
    restored = resumed.trainer.optimizer.state_dict()["state"]
    assert restored.keys() == optimizer.keys() and restored
    for index, moments in optimizer.items():
        for name, value in moments.items():
            assert torch.equal(restored[index][name], value), (index, name)


def test_scheduled_sources_apply_from_their_step_and_a_swap_cancels_them() -> None:
    mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
    mixer.set_endpoints([EndpointSpec("local:1", name="a")])
    mixer.schedule(mixer.probe([EndpointSpec("local:2", name="b")]), 3)
    for step, expected in ((2, "a"), (3, "b"), (4, "b")):
        assert [s.name for s in mixer.begin_step(step)] == [expected], step
        mixer.end_step()
    mixer.schedule(mixer.probe([EndpointSpec("local:3", name="c")]), 6)
    assert [(step, [s.name for s in specs]) for step, specs in mixer.scheduled] == [(6, ["c"])]
    mixer.set_endpoints([EndpointSpec("local:4", name="d")])  # the caller's newest choice
    assert mixer.scheduled == []
    assert [s.name for s in mixer.begin_step(6)] == ["d"]
    # The journal forgets what a swap cancelled (entries from its step on), keeps the rest.
    journal = [Swap(3, ["b@local:2=1"]), Swap(6, ["c@local:3=1"])]
    assert journal_swap(journal, Swap(5, ["d@local:4=1"])) == [journal[0], Swap(5, ["d@local:4=1"])]


def test_a_row_torn_by_a_kill_is_dropped_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = MetricsLog(tmp_path, "jsonl")
    for step in (1, 2, 3):
        metrics.write(step, step, {"env/reward_mean": 0.5})
    with metrics.path.open("a") as fh:
        fh.write('{"step": 4, "weight_ver')  # the kill came mid-write
    with caplog.at_level(logging.WARNING, "rlhf.trainer.metrics"):
        metrics.truncate_after(2)
    assert [r["step"] for r in read_metrics(metrics.path)] == [1, 2]
    assert [r.line for r in caplog.records] == [4]  # type: ignore[attr-defined]


def test_rlhf_watch_follows_a_run_across_a_trainer_restart_without_losing_a_row(
    tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rlhf watch` loses its stream when the trainer dies mid-run, waits for it, and goes on
    from the step after the last it showed: the restarted trainer (--resume-interrupted)
    redoes the steps after its checkpoint, and the watcher shows every step exactly once."""
    from services.trainer.api.display import ProgressDisplay

    shown: list[int] = []
    reconnected = threading.Event()
    real_step, real_say = ProgressDisplay.step, ProgressDisplay.say

    def record(display: ProgressDisplay, step: int, stats: dict[str, float]) -> None:
        shown.append(step)
        real_step(display, step, stats)

    def said(display: ProgressDisplay, text: str) -> None:
        if text.startswith("reconnected"):
            reconnected.set()
        real_say(display, text)

    monkeypatch.setattr(ProgressDisplay, "step", record)
    monkeypatch.setattr(ProgressDisplay, "say", said)
    first, copy = tmp_path / "first", tmp_path / "copy"
    result: dict[str, int] = {}
    with trainer(first, tiny_lm) as t:
        port = int(t.client.address.rpartition(":")[2])
        waiting = t.policy.hold(4)  # step 4's Generate: steps 1-3 done, checkpoint at 2
        t.client.start(_request(tiny_lm, "w", 5, save_every=2))
        watcher_client = TrainerClient(t.client.address)
        watcher = threading.Thread(
            target=lambda: result.update(code=watching.watch_run(watcher_client, "w", 1, 60))
        )
        watcher.start()
        assert waiting.wait(60), "step 4 never reached Generate"
        for _ in range(300):  # the watcher has shown steps 1-3 (a step beyond the checkpoint)
            if shown == [1, 2, 3]:
                break
            threading.Event().wait(0.1)
        assert shown == [1, 2, 3]
        shutil.copytree(first, copy)  # the disk as a SIGKILL during step 4 leaves it
    # The trainer is gone; a new one on the same port resumes the run from step 2's checkpoint.
    # Its first Generate (step 3, redone) waits until the watcher is back, which asked for the
    # steps from 4 on: the redone step 3 arrives live and must not be shown again.
    with trainer(copy, tiny_lm, port=port, holds=(1,), resume_interrupted=True) as again:
        assert reconnected.wait(60), "the watcher did not reconnect"
        again.policy.release(1)
        watcher.join(120)
        assert not watcher.is_alive()
    watcher_client.close()
    assert result["code"] == 0
    assert shown == [1, 2, 3, 4, 5]  # step 3, redone after the restart, is not shown twice
    assert [r["step"] for r in _rows(copy, "w")] == [1, 2, 3, 4, 5]
