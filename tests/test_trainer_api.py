"""The trainer's control API on a real gRPC server (port 0), with runs on a tiny model and
in-process transports: WatchRun ends with the run's terminal state, StopRun answers at once,
GetRun shows the phase of the step in progress."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.local_transports import LocalPolicy, LocalReward
from rlhf.cli import main
from rlhf.server import GrpcService
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.reward.backends.vader import VaderBackend
from services.trainer.api.client import TrainerClient, TrainerError
from services.trainer.api.runs import progress_to_proto
from services.trainer.api.service import TrainerServicer, Transports
from services.trainer.config import GenerationConfig, TrainerServiceConfig
from services.trainer.orchestrator.peers import Rollout
from services.trainer.orchestrator.progress import PHASES, Progress
from tests.fuzz_requests import start_request
from tests.servers import open_config

END = trainer_pb2.WATCH_EVENT_END


class GatedPolicy(LocalPolicy):
    """A policy whose Generate, once `close_gate()` is called, waits until `release` is set;
    `generating` tells a test the step is inside it. `fail` makes Generate raise."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.gated = False
        self.generating = threading.Event()
        self.release = threading.Event()
        self.fail = ""

    def generate(self, prompts: list[str], gen: GenerationConfig, seed: int) -> Rollout:
        if self.fail:
            raise RuntimeError(self.fail)
        if self.gated:
            self.generating.set()
            assert self.release.wait(60), "the test never released the gate"
        return super().generate(prompts, gen, seed)


@pytest.fixture
def policy(tiny_lm: Path) -> GatedPolicy:
    return GatedPolicy(str(tiny_lm))


@pytest.fixture
def served(
    policy: GatedPolicy, tmp_path: Path, tiny_lm: Path
) -> Iterator[tuple[TrainerClient, TrainerServicer]]:
    transports = Transports(
        policy=lambda address, limits: policy,
        reward=lambda address, limits: LocalReward(VaderBackend(), address=address),
    )
    servicer = TrainerServicer(
        TrainerServiceConfig(
            policy="local:1",
            reward=["local:2"],
            output_dir=str(tmp_path),
            model_root=[str(tiny_lm)],
        ),
        transports,
    )
    service = GrpcService("trainer", open_config(grace_s=0))
    service.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, "trainer")
    port = service.start()
    service.set_serving()
    client = TrainerClient(f"127.0.0.1:{port}")
    yield client, servicer
    policy.release.set()
    client.close()
    for run in servicer.runs.values():  # no run thread outlives its test
        if run.thread is not None:
            run.thread.join(60)
    service.stop(grace_s=0)


@pytest.fixture
def trainer(served: tuple[TrainerClient, TrainerServicer]) -> TrainerClient:
    return served[0]


def _start(client: TrainerClient, tiny_lm: Path, run_id: str, steps: int) -> None:
    status = client.start(start_request(str(tiny_lm), run_id, steps))
    assert status.run_id == run_id and status.total_steps == steps


def test_watch_ends_with_completed(trainer: TrainerClient, tiny_lm: Path) -> None:
    _start(trainer, tiny_lm, "done", steps=2)
    messages = list(trainer.watch("done", from_step=1))
    steps = [m.step for m in messages if m.event == trainer_pb2.WATCH_EVENT_STEP]
    assert steps == [1, 2]
    assert [m.event for m in messages].count(END) == 1
    end = messages[-1]
    assert end.event == END and end.state == trainer_pb2.RUN_STATE_COMPLETED
    assert end.step == 2 and end.error == ""
    # The live part of the stream carried the run's phases as they came (a watcher that is
    # behind sees the latest one only), step after step.
    progress = [m.progress for m in messages if m.event == trainer_pb2.WATCH_EVENT_PROGRESS]
    assert progress and all(p.phase != trainer_pb2.RUN_PHASE_UNSPECIFIED for p in progress)
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    # A watch of an ended run replays its steps and ends at once with the same END.
    replay = list(trainer.watch("done", from_step=2))
    assert [(m.event, m.step) for m in replay] == [(trainer_pb2.WATCH_EVENT_STEP, 2), (END, 2)]
    assert replay[-1].state == trainer_pb2.RUN_STATE_COMPLETED


def test_an_ended_run_lets_go_of_its_models_and_keeps_its_status(
    served: tuple[TrainerClient, TrainerServicer], policy: GatedPolicy, tiny_lm: Path
) -> None:
    # A trainer that serves run after run must not hold every ended run's model, reference
    # and optimizer state (the bench saw a trainer grow by a run's worth of memory per run).
    client, servicer = served
    policy.gated = True  # the run waits in its first Generate, its loop attached
    _start(client, tiny_lm, "let-go", steps=2)
    assert policy.generating.wait(60)
    held = weakref.ref(servicer.runs["let-go"].loop or _never_attached())
    policy.release.set()
    assert list(client.watch("let-go", from_step=1))[-1].event == END
    servicer.runs["let-go"].thread.join(60)
    gc.collect()
    assert servicer.runs["let-go"].loop is None and held() is None
    status = client.get("let-go")
    assert status.state == trainer_pb2.RUN_STATE_COMPLETED
    assert status.step == 2 and status.weight_version >= 2
    assert status.checkpoint_dir.endswith("checkpoints")
    assert "objective/kl" in status.last_metrics


def _never_attached() -> object:
    raise AssertionError("the run's loop was never attached")


def test_stop_answers_at_once_and_watch_ends_with_stopped(
    trainer: TrainerClient, policy: GatedPolicy, tiny_lm: Path, tmp_path: Path
) -> None:
    policy.gated = True
    _start(trainer, tiny_lm, "held", steps=50)
    assert policy.generating.wait(60), "the first step never reached Generate"

    status = trainer.get("held")  # the step waits inside Generate: GetRun says so
    assert status.state == trainer_pb2.RUN_STATE_RUNNING
    assert status.progress.phase == trainer_pb2.RUN_PHASE_GENERATING
    assert status.progress.step == 1 and status.progress.retries == 0
    assert 0 < status.progress.phase_started <= time.time()

    began = time.monotonic()
    stopped = trainer.stop("held")
    assert time.monotonic() - began < 1.0
    assert stopped.state == trainer_pb2.RUN_STATE_STOPPING
    assert not policy.release.is_set()  # it answered while the step was still running

    policy.release.set()
    messages = list(trainer.watch("held", from_step=1))
    end = messages[-1]
    assert end.event == END and end.state == trainer_pb2.RUN_STATE_STOPPED, end.error
    assert end.step == 1  # the step in progress finished, then the run stopped
    assert [m.step for m in messages if m.event == trainer_pb2.WATCH_EVENT_STEP] == [1]
    assert (tmp_path / "held" / "checkpoints" / "step-000001").is_dir()


def test_watch_ends_with_failed_and_its_error(
    trainer: TrainerClient, policy: GatedPolicy, tiny_lm: Path
) -> None:
    policy.fail = "the policy exploded"
    _start(trainer, tiny_lm, "broken", steps=3)
    messages = list(trainer.watch("broken", from_step=1))
    end = messages[-1]
    assert end.event == END and end.state == trainer_pb2.RUN_STATE_FAILED
    assert "the policy exploded" in end.error
    assert end.progress.phase == trainer_pb2.RUN_PHASE_GENERATING  # where it failed
    assert not [m for m in messages if m.event == trainer_pb2.WATCH_EVENT_STEP]


def test_unknown_run_is_one_line(
    trainer: TrainerClient, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TrainerError) as caught:
        trainer.get("nope")
    assert caught.value.code == "NOT_FOUND" and "nope" in caught.value.details
    for command in (["status"], ["watch"], ["stop"]):
        assert main([*command, "--trainer", trainer.address, "--run-id", "nope"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "NOT_FOUND" in err and "nope" in err, err


def test_every_phase_of_the_loop_has_a_wire_value() -> None:
    """The loop's phases all cross the wire (a new phase without a RunPhase would fail GetRun)."""
    for phase in PHASES:
        wire = progress_to_proto(Progress(phase=phase, step=2, since=time.time() - 5, retries=1))
        assert trainer_pb2.RunPhase.Name(wire.phase) == f"RUN_PHASE_{phase.upper()}"
        assert wire.step == 2 and wire.retries == 1 and wire.phase_elapsed_s >= 5
