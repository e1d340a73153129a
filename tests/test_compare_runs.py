"""tools/compare_runs: two run folders' reward and KL curves in one PNG, and their table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.compare_runs import main, seconds_per_step


def _run_folder(root: Path, name: str, rewards: list[float], step_s: float, **config: dict) -> Path:
    """A run folder as the trainer leaves it: metrics.jsonl rows (one every `step_s` seconds
    after a slow first step) and a run.json carrying `config`."""
    folder = root / name
    folder.mkdir(parents=True)
    rows = [
        {
            "step": step,
            "weight_version": step,
            "time": 1000.0 + 60.0 + step_s * (step - 1),
            "env/reward_mean": reward,
            "objective/kl": 0.25 * step,
        }
        for step, reward in enumerate(rewards, 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "run.json").write_text(json.dumps({"run_id": name, "config": config}))
    return folder


def test_two_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp32 = _run_folder(
        tmp_path, "fp32", [0.1, 0.2, 0.3, 0.4, 0.5], 20.0,
        ppo={"mixed_precision": "no"}, run={"max_staleness": 0},
    )  # fmt: skip
    bf16 = _run_folder(
        tmp_path, "bf16", [0.0, 0.0, 0.3, 0.6, 0.9, 0.9], 5.0,
        ppo={"mixed_precision": "bf16"}, run={"max_staleness": 1},
    )  # fmt: skip
    png = tmp_path / "out" / "compare.png"
    assert main([str(fp32), str(bf16), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run", "steps", "mixed_prec", "stale", "reward", "first", "reward", "last", "final", "kl",
        "s/step",
    ]  # fmt: skip
    assert lines[1].split() == ["fp32", "5", "no", "0", "+0.2000", "+0.4000", "1.250", "20.0"]
    assert lines[2].split() == ["bf16", "6", "bf16", "1", "+0.1000", "+0.8000", "1.500", "5.0"]


def test_labels_and_a_run_without_its_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _run_folder(tmp_path, "a", [0.5], 9.0)
    b = _run_folder(tmp_path, "b", [0.1, 0.3], 7.0)
    (b / "run.json").unlink()
    argv = [str(a), str(b), "--labels", "old", "new", "--output", str(tmp_path / "c.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:4] == ["old", "1", "-", "-"]
    assert out[2].split()[:4] == ["new", "2", "-", "-"]


def test_a_folder_without_metrics_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _run_folder(tmp_path, "a", [0.5, 0.6], 9.0)
    assert main([str(a), str(tmp_path / "nothing"), "--output", str(tmp_path / "c.png")]) == 1
    assert "nothing has no metrics.jsonl: not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_seconds_per_step_leaves_out_the_first_step() -> None:
    rows = [{"time": 100.0, "time/step": 50.0}, {"time": 110.0}, {"time": 130.0}]
    assert seconds_per_step(rows) == 15.0
    assert seconds_per_step(rows[:1]) == 50.0
