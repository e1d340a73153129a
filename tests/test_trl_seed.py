"""The TRL 0.11.4 baseline: bench/trl_env.py prepares its own venv, and bench/trl_seed_loop.py
runs the seed's loop in it on the tiny model and prints its JSON line, also step by step
through bench/trl_side.py.

The first preparation installs torch and 55 pins from the registry: 72 s on the 2-core machine
lightly loaded, 181 s beside other runs. After that it is a stamp check (0.1 s), and the two
slow tests took 37 s beside other runs. A venv that cannot be prepared (no python3.11, a
registry without the pins) fails them with pip's error: the bench could not run either.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import trl_env
from bench.trl_seed_loop import visible_devices
from bench.trl_side import TrlSide

ROOT = Path(__file__).resolve().parents[1]
LOOP = ROOT / "bench" / "trl_seed_loop.py"
PHASES = {"generate", "score", "step"}


@pytest.fixture(scope="module")
def trl_python() -> Path:
    return trl_env.prepare()  # PrepareError (pip's own output) fails the tests that need it


def _loop(python: Path, model: Path, *flags: str) -> list[dict]:
    done = subprocess.run(
        [str(python), str(LOOP), "--model", str(model), "--seed", "0", "--threads", "1", *flags],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
def test_seed_loop_runs_in_its_venv_and_reports(trl_python: Path, tiny_lm: Path) -> None:
    [summary] = _loop(trl_python, tiny_lm, "--steps", "2", "--warmup", "1")
    assert summary["versions"]["trl"] == "0.11.4"
    assert summary["versions"]["torch"].startswith("2.13.0")
    assert summary["versions"]["transformers"].startswith("5.")
    assert summary["steps"] == 2 and summary["episodes"] == 8  # batch 4, warm-up excluded
    assert len(summary["step_s"]) == 2
    assert summary["episodes_per_s"] == pytest.approx(8 / sum(summary["step_s"]))
    assert set(summary["phase_s_median"]) == PHASES == set(summary["phase_s_mean"])
    assert all(v > 0 for v in summary["phase_s_mean"].values())
    assert 0 < summary["generated_tokens"] <= 2 * 4 * 64
    assert summary["generated_tokens_per_s"] > 0
    assert summary["peak_rss_mib"] > 100  # torch alone is more than this
    assert summary["torch_threads"] == 1


@pytest.mark.slow
def test_trl_side_runs_one_step_per_call(trl_python: Path, tiny_lm: Path) -> None:
    with TrlSide(trl_python, tiny_lm, seed=0, threads=1, warmup=0) as trl:
        first, second = trl.step(), trl.step()
    assert trl.ready is not None and trl.ready["ready"] is True
    assert first["episodes"] == second["episodes"] == 4
    assert trl.summary is not None and trl.summary["steps"] == 2
    assert trl.summary["step_s"] == [first["seconds"], second["seconds"]]


def test_a_matching_stamp_means_nothing_is_run(tmp_path: Path, monkeypatch) -> None:
    requirements = tmp_path / "req.txt"
    requirements.write_text("# pins\ntorch==2.13.0\ntrl==0.11.4\n")
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / trl_env.STAMP).write_text(trl_env._digest(requirements) + "\n")

    def must_not_run(command: list[str], log: list[str]) -> None:
        raise AssertionError(f"ran {command}")

    monkeypatch.setattr(trl_env, "_run", must_not_run)
    assert trl_env.prepare(venv, requirements) == venv / "bin" / "python"
    requirements.write_text("torch==2.13.0\ntrl==0.11.5\n")  # changed pins: a rebuild is due
    assert not trl_env.is_prepared(venv, requirements)
    with pytest.raises(AssertionError, match="ran"):
        trl_env.prepare(venv, requirements)


def test_a_failed_command_raises_with_its_output() -> None:
    failing = [sys.executable, "-c", "import sys; print('ERROR: no such pin'); sys.exit(3)"]
    with pytest.raises(trl_env.PrepareError, match=r"exit 3\):\nERROR: no such pin"):
        trl_env._run(failing, [])


def test_requirements_need_one_torch_pin(tmp_path: Path) -> None:
    requirements = tmp_path / "req.txt"
    requirements.write_text("trl==0.11.4\n")
    with pytest.raises(trl_env.PrepareError, match="exactly one torch"):
        trl_env._pins(requirements)


@pytest.mark.parametrize(
    ("device", "visible", "shown"),
    [
        ("cpu", None, ""),  # TRL's Accelerator would take any GPU it sees
        ("cpu", "0,1", ""),
        ("cuda", None, "0"),
        ("cuda:1", None, "1"),
        ("cuda:1", "4, 6", "6"),  # the index counts within what this process sees
    ],
)
def test_the_loop_shows_trl_the_asked_for_device_alone(
    device: str, visible: str | None, shown: str
) -> None:
    assert visible_devices(device, visible) == shown


@pytest.mark.parametrize(
    ("device", "visible"), [("cuda:2", "0,1"), ("tpu", None), ("cuda:x", None)]
)
def test_a_device_the_loop_cannot_show_is_refused(device: str, visible: str | None) -> None:
    with pytest.raises(ValueError, match="--device"):
        visible_devices(device, visible)
