"""`make run`'s flags (--precision, --max-staleness) and the header line on precision and
staleness; no service is started."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from rlhf.cli import build_parser
from rlhf.config import service_settings
from services.policy.config import PolicyServiceConfig
from services.trainer.config import load_train_config
from tools import main_job


def _job_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> dict:
    """The keywords main_job.main passes to run_ppo_job for `argv`."""
    import rlhf.models

    calls: list[dict] = []

    def fake_ppo_job(model, rewards, config, output_dir, run_id="", **kw):  # noqa: ANN001
        calls.append({"model": model, **kw})
        return main_job.PPOJobResult(0, output_dir / "r", 0.1)

    monkeypatch.setattr(rlhf.models, "prepare_default_policy", lambda: tmp_path / "smol")
    monkeypatch.setattr(main_job, "run_ppo_job", fake_ppo_job)
    assert main_job.main(["--output-dir", str(tmp_path), *argv]) == 0
    (call,) = calls
    return call


def test_default_precision_adds_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    call = _job_call(monkeypatch, tmp_path, [])
    # Only the thread split of configs/default.yaml's staleness 1 on 2 cores: one each.
    assert call["policy_args"] == ["--engine", "hf", "--threads", "1"]
    assert call["overrides"] == []
    assert call["trainer_threads"] == 1


def test_lock_step_gives_every_core_to_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    call = _job_call(monkeypatch, tmp_path, ["--set", "run.max_staleness=0"])
    assert call["policy_args"][-2:] == ["--threads", "4"] and call["trainer_threads"] == 4
    call = _job_call(monkeypatch, tmp_path, ["--max-staleness", "2"])
    assert call["policy_args"][-2:] == ["--threads", "2"] and call["trainer_threads"] == 2


def test_bf16_serves_the_policy_in_bfloat16(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    call = _job_call(monkeypatch, tmp_path, ["--precision", "bf16"])
    assert call["overrides"] == ["ppo.mixed_precision=bf16"]
    # The real `rlhf policy serve` parser reads the arguments the job starts the policy with.
    argv = main_job.policy_command(call["model"], call["policy_args"])
    _, config = service_settings(build_parser().parse_args(argv), PolicyServiceConfig, "t")
    assert config.dtype == "bfloat16" and config.model == str(tmp_path / "smol")


def test_engine_flag_reaches_the_policy_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    call = _job_call(monkeypatch, tmp_path, ["--engine", "vllm"])
    argv = main_job.policy_command(call["model"], call["policy_args"])
    _, config = service_settings(build_parser().parse_args(argv), PolicyServiceConfig, "t")
    assert config.engine == "vllm"


def test_staleness_flag_is_an_override_and_set_comes_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = ["--max-staleness", "0", "--precision", "bf16", "--set", "run.steps=3"]
    call = _job_call(monkeypatch, tmp_path, argv)
    assert call["overrides"] == ["ppo.mixed_precision=bf16", "run.max_staleness=0", "run.steps=3"]


def test_negative_staleness_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main_job.main(["--max-staleness", "-1"])
    assert exit_.value.code == 2 and "-1 is below 0" in capsys.readouterr().err


def test_the_trainer_takes_the_overrides_and_the_header_says_them() -> None:
    _, overrides = main_job.job_settings("bf16", 2)
    config = load_train_config(main_job.DEFAULT_CONFIG.read_text(), overrides)
    line = main_job.settings_line(dataclasses.asdict(config), "bfloat16")
    assert line == (
        "precision: policy service bfloat16, trainer bf16 autocast over fp32 master weights; "
        "max staleness 2: the rollout runs ahead under the update, on weights at most 2 "
        "version(s) old"
    )


def test_header_of_a_lock_step_fp32_run() -> None:
    config = {"ppo": {"mixed_precision": "no"}, "run": {"max_staleness": 0}}
    line = main_job.settings_line(config, "float32")
    assert line.startswith("precision: policy service float32, trainer fp32; max staleness 0, ")
    assert "lock-step" in line


def test_header_of_a_trainer_without_the_settings() -> None:
    line = main_job.settings_line({"ppo": {}, "run": {}}, "float32")
    assert "trainer fp32 (it has no ppo.mixed_precision)" in line
    assert "(the trainer has no run.max_staleness)" in line
