"""The chaos test (tools/chaos.py): a PPO run across three service processes survives a seeded
schedule of SIGKILLs and restarts of its services, trainer kills resumed through the API, and a
frozen peer, and ends bit-identical to an uninterrupted run. Plus the schedule and the checks
themselves, on made-up inputs (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools.chaos import AIMED_PHASES, ChaosConfig, make_schedule, run_chaos
from tools.chaos_checks import differences, run_problems
from tools.chaos_stack import Seen

SEED = 13
STOPS = 1
"""SIGSTOP/SIGCONT of a peer for ChaosConfig.stop_s: a frozen call resumes when the peer does."""


@pytest.mark.slow
def test_a_run_survives_a_seeded_chaos_schedule(
    tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ChaosConfig(seed=SEED, stops=STOPS)
    report = run_chaos(config, tmp_path, model=tiny_lm)
    summary = report.summary()
    with capsys.disabled():  # the table is the test's evidence: shown in every run
        print(f"\n{summary}")
    struck = [o for o in report.outcomes if o.at is not None]
    kills = [o for o in struck if o.event.action == "kill"]
    assert len(kills) == config.kills >= 10, summary
    assert {o.event.target for o in kills} == {"policy", "reward", "trainer"}, summary
    assert sum(o.event.action == "stop" for o in struck) == STOPS, summary
    assert all(o.survived for o in struck), summary
    assert report.ok, summary


def test_the_schedule_is_seeded_spread_and_in_run_order() -> None:
    config = ChaosConfig(seed=5, steps=16, kills=7, stops=2)
    schedule = make_schedule(config)
    assert schedule == make_schedule(config)  # the seed alone decides it
    assert schedule != make_schedule(ChaosConfig(seed=6, steps=16, kills=7, stops=2))
    kills = [e.target for e in schedule if e.action == "kill"]
    assert sorted(kills) == sorted(["policy", "reward", "trainer"] * 2 + ["policy"])
    assert all(e.target in ("policy", "reward") for e in schedule if e.action == "stop")
    steps = [e.step for e in schedule]
    assert steps == sorted(set(steps))  # one event per step, in the order the run meets them
    assert all(e.phase in AIMED_PHASES for e in schedule)
    last = config.steps - config.quiet_steps
    assert all(config.first_step <= e.step <= last for e in schedule)
    assert all(0 <= e.delay_s <= config.max_delay_s for e in schedule)


def test_without_policy_kills_the_policy_is_never_killed() -> None:
    schedule = make_schedule(ChaosConfig(kill_policy=False, kills=10, stops=0))
    assert sorted(e.target for e in schedule) == ["reward"] * 5 + ["trainer"] * 5


def test_a_schedule_that_does_not_fit_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        make_schedule(ChaosConfig(steps=8, kills=20))


def _write_metrics(folder: Path, rows: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "weight_version": v}) for s, v in rows]
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def test_run_problems_catch_a_repeated_step_and_a_reused_version(tmp_path: Path) -> None:
    good = _write_metrics(tmp_path / "good", [(1, 4), (2, 5), (3, 7)])
    assert run_problems(good, 3) == []
    repeated = _write_metrics(tmp_path / "repeated", [(1, 4), (2, 5), (2, 6), (3, 7)])
    assert "each once" in " ".join(run_problems(repeated, 3))
    missing = _write_metrics(tmp_path / "missing", [(1, 4), (3, 7)])
    assert "each once" in " ".join(run_problems(missing, 3))
    reused = _write_metrics(tmp_path / "reused", [(1, 4), (2, 5), (3, 5)])
    assert "strictly increase" in " ".join(run_problems(reused, 3))
    assert "missing" in run_problems(tmp_path / "none", 3)[0]


def test_differences_are_bit_exact_and_name_the_path() -> None:
    state = {"model": {"w": torch.ones(3)}, "kl": {"value": 0.2}, "rng": (1, [2, 3])}
    same = {"model": {"w": torch.ones(3)}, "kl": {"value": 0.2}, "rng": (1, [2, 3])}
    assert differences(state, same, "state") == []
    nudged = {**same, "model": {"w": torch.tensor([1.0, 1.0, 1.0 + 2**-23])}}
    assert differences(state, nudged, "state") == ["state.model.w: tensors differ"]
    as_double = {**same, "model": {"w": torch.ones(3, dtype=torch.float64)}}
    assert differences(state, as_double, "state") == ["state.model.w: tensors differ"]
    assert differences(state, {**same, "rng": (1, [2, 4])}, "s") == ["s.rng[1][1]: 3 != 4"]
    assert "keys differ" in differences(state, {"model": same["model"]}, "s")[0]


def test_a_point_is_reached_at_its_phase_and_after_it() -> None:
    at = Seen(step=5, phase="updating", finished=4, state="RUNNING")
    assert at.reached(5, "updating") and at.reached(5, "scoring") and at.reached(4, "syncing")
    assert not at.reached(5, "syncing") and not at.reached(6, "generating")
    # A resumed trainer loads before it redoes a step: behind every point of a step.
    assert not Seen(step=0, phase="loading", finished=0, state="RUNNING").reached(1, "generating")
    assert Seen(step=7, phase="idle", finished=7, state="COMPLETED").terminal
    assert not at.terminal
