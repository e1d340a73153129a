"""Checkpoints load without running code (issue #12, item 5): the trainer state is safetensors +
JSON and round-trips bit for bit; an old pickled trainer_state.pt is refused unopened (a
planted one whose unpickling would create a marker file creates nothing), through the control
API and through the loop; the `latest` pointer cannot lead out of the checkpoint folder; the
offline converter reads trusted old checkpoints with torch's weights-only unpickler."""

from __future__ import annotations

import math
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.local_transports import LocalPolicy, LocalReward
from rlhf.server import build_server
from rlhf.v1 import trainer_pb2
from services.reward.backends.vader import VaderBackend
from services.trainer.api.client import TrainerClient, TrainerError
from services.trainer.api.service import TrainerServicer, Transports, servicers
from services.trainer.config import TrainerServiceConfig, load_train_config
from services.trainer.learner.seeding import rng_state
from services.trainer.orchestrator.checkpoint import latest_checkpoint
from services.trainer.orchestrator.loop import TrainingLoop
from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer
from services.trainer.orchestrator.trainer_state import (
    LEGACY_STATE,
    LegacyCheckpoint,
    convert_legacy,
    main,
    read_state,
    write_state,
)
from tests.servers import open_config


class Planted:
    """Unpickling this runs os.system: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _plant(checkpoints: Path, marker: Path) -> Path:
    """An old-format checkpoint folder whose trainer_state.pt would run code when unpickled."""
    folder = checkpoints / "step-000001"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "trainer": Planted(marker)}, folder / LEGACY_STATE)
    (checkpoints / "latest").write_text("step-000001\n")
    return folder


def _state() -> dict:
    """A trainer state's shapes: tensors of several dtypes and ranks, tuples, int keys, NaN."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    optimizer.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    optimizer.step()
    return {
        "step": 7,
        "trainer": {
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "generator": torch.Generator().manual_seed(3).get_state(),
            "model": {"w": torch.randn(4, 4).to(torch.bfloat16), "b": torch.zeros(0)},
            "kl_ctl": {"kind": "adaptive", "value": 0.123456789012345678, "target": math.nan},
        },
        "rewards": ["rm@h:1=0.2"],
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_state_round_trips_exactly(tmp_path: Path) -> None:
    state = _state()
    write_state(tmp_path, state)
    assert not list(tmp_path.glob("*.pt"))
    loaded = read_state(tmp_path)
    assert _same(state, loaded)
    # The optimizer and the RNGs take it back, and then draw the same numbers.
    random.setstate(loaded["trainer"]["rng"]["python"])
    first = random.random()
    random.setstate(state["trainer"]["rng"]["python"])
    assert random.random() == first


def test_planted_pickle_is_not_run_by_the_loop(tiny_lm: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    overrides = [f"model_name={tiny_lm}", "log_with=jsonl", f"run.output_dir={tmp_path}"]
    config = load_train_config(None, [*overrides, "run.run_id=old", "batch_size=2"])
    _plant(tmp_path / "old" / "checkpoints", marker)
    mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
    mixer.set_endpoints([EndpointSpec("local:1")])
    with pytest.raises(LegacyCheckpoint, match="convert it once with"):
        TrainingLoop(config, LocalPolicy(str(tiny_lm)), mixer, resume=True)
    assert not marker.exists()


@pytest.fixture
def trainer(tiny_lm: Path, tmp_path: Path) -> Iterator[TrainerClient]:
    transports = Transports(
        policy=lambda address, limits: LocalPolicy(str(tiny_lm), address=address),
        reward=lambda address, limits: LocalReward(VaderBackend(), address=address),
    )
    settings = TrainerServiceConfig(
        policy="local:1", reward=["local:2"], output_dir=str(tmp_path / "runs"),
        model_root=[str(tiny_lm)],
    )  # fmt: skip
    servicer = TrainerServicer(settings, transports)
    service = build_server("trainer", servicers(servicer), open_config(grace_s=0))
    client = TrainerClient(f"127.0.0.1:{service.port}")
    yield client
    client.close()
    for run in servicer.runs.values():
        if run.thread is not None:
            run.thread.join(60)
    service.stop(grace_s=0)


def _resume(client: TrainerClient, tiny_lm: Path, run_id: str) -> str:
    request = trainer_pb2.StartRunRequest(run_id=run_id, resume=True)
    request.overrides.update({"ppo.model_name": str(tiny_lm), "ppo.log_with": "jsonl"})
    with pytest.raises(TrainerError) as caught:
        client.start(request)
    assert caught.value.code == "FAILED_PRECONDITION"
    return caught.value.details


def test_planted_pickle_is_not_run_through_the_api(
    trainer: TrainerClient, tiny_lm: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    folder = _plant(tmp_path / "runs" / "old" / "checkpoints", marker)
    details = _resume(trainer, tiny_lm, "old")
    assert LEGACY_STATE in details and "convert it once with" in details and str(folder) in details
    assert not marker.exists()
    # A `latest` pointer that leads out of the checkpoint folder is refused too.
    elsewhere = tmp_path / "runs" / "other" / "checkpoints"
    elsewhere.mkdir(parents=True)
    (elsewhere / "latest").write_text("../../old/checkpoints/step-000001\n")
    assert "not a step-NNNNNN checkpoint folder" in _resume(trainer, tiny_lm, "other")
    assert "has no checkpoint" in _resume(trainer, tiny_lm, "never")
    assert not marker.exists()


def test_latest_pointer_stays_inside(tmp_path: Path) -> None:
    (tmp_path / "step-000001").mkdir()
    (tmp_path / "latest").write_text("step-000001\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    (tmp_path / "latest").write_text("/etc\n")
    with pytest.raises(ValueError, match="not a step-NNNNNN"):
        latest_checkpoint(tmp_path)


def test_converter_reads_trusted_old_checkpoints_without_running_code(tmp_path: Path) -> None:
    state = _state()
    old = tmp_path / "step-000002"
    old.mkdir()
    torch.save(state, old / LEGACY_STATE)
    assert main(["convert", str(old)]) == 0
    assert _same(state, read_state(old))

    marker = tmp_path / "pwned"
    planted = _plant(tmp_path / "planted", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        convert_legacy(planted)  # torch's weights-only unpickler refuses the callable
    assert main(["convert", str(planted)]) == 1  # one line, no traceback
    assert not marker.exists()
