"""The stage commands (`rlhf sft`, `rlhf rm`), `make run`'s job, and the pipeline that chains
SFT -> reward model -> PPO: it hands the SFT folder to PPO (model_name and the policy service's
--model) and the reward model to a reward service, skips finished stages and reruns them with
--force.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.stage_data import write_pair_data, write_sft_data
from tools import main_job
from tools.launch import service_threads
from tools.stages.pipeline import PPO_DONE, PipelineConfig, run_pipeline


# --- commands ------------------------------------------------------------------------------------
def test_commands_wire_the_stages(
    tiny_lm: Path, tiny_reward_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlhf.cli import main

    sft_data, pair_data = write_sft_data(tmp_path), write_pair_data(tmp_path)
    sft = ["sft", "--model", str(tiny_lm), "--data", str(sft_data), "--output", str(tmp_path / "s")]
    assert main([*sft, "--max-steps", "1", "--batch-size", "2", "--seed", "1"]) == 0
    stage = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert stage["config"]["batch_size"] == 2 and stage["config"]["seed"] == 1
    assert main(sft) == 1  # exists, no --force: one line, no traceback
    assert "--force" in capsys.readouterr().err

    rm = ["rm", "--model", str(tiny_reward_model), "--data", str(pair_data)]
    rm += ["--output", str(tmp_path / "r"), "--max-steps", "2", "--eval-fraction", "0.25"]
    assert main([*rm, "--input", "response"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["input"] == "response" and metrics["heldout_pairs"] == 2


def test_make_run_is_one_ppo_job_on_the_default_policy_and_vader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import rlhf.models

    calls = []

    def fake_ppo_job(model, rewards, config, output_dir, run_id="", **kw):  # noqa: ANN001
        calls.append((model, rewards, config, output_dir, kw))
        return main_job.PPOJobResult(0, output_dir / "r", 0.1)

    monkeypatch.setattr(rlhf.models, "prepare_default_policy", lambda: tmp_path / "smol")
    monkeypatch.setattr(main_job, "run_ppo_job", fake_ppo_job)
    assert main_job.main(["--output-dir", str(tmp_path), "--set", "run.steps=3"]) == 0
    ((model, rewards, config, output_dir, keywords),) = calls
    assert model == str(tmp_path / "smol") and config == main_job.DEFAULT_CONFIG
    assert [(r.args, r.weight) for r in rewards] == [
        (["reward", "serve", "--backend", "vader"], 1.0)
    ]
    assert output_dir == tmp_path
    # fp32, the default precision, adds no override; staleness 1 splits the cores.
    threads = service_threads(overlapping=True)
    assert keywords == {
        "overrides": ["run.steps=3"],
        "policy_args": ["--engine", "hf", "--threads", str(threads.policy)],
        "trainer_threads": threads.trainer,
    }


# --- pipeline ------------------------------------------------------------------------------------
def test_pipeline_defaults_to_the_shipped_ppo_config() -> None:
    """`make run`'s configs/default.yaml, found from the installed tree (a wrong parents[]
    index once pointed above the repository)."""
    default = Path(PipelineConfig().ppo_config)
    assert default == main_job.DEFAULT_CONFIG and default.is_file(), default


@pytest.fixture()
def ppo_config(tmp_path: Path) -> Path:
    """A PPO run sized for tiny models (model_name and output_dir come from the pipeline)."""
    config = {
        "ppo": {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "log_with": "jsonl"},
        "generation": {"max_new_tokens": 4, "apply_chat_template": True},
        "run": {"steps": 3, "save_every": 1},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture()
def pipeline_config(
    tiny_lm: Path, tiny_reward_model: Path, ppo_config: Path, tmp_path: Path
) -> Callable[..., PipelineConfig]:
    """Makes a PipelineConfig of the tiny models, data and PPO run into tmp_path/pipe; keywords
    set further fields."""
    sft_data, pair_data = write_sft_data(tmp_path), write_pair_data(tmp_path)

    def make(**kw: object) -> PipelineConfig:
        return PipelineConfig(
            output=str(tmp_path / "pipe"),
            base_model=str(tiny_lm),
            sft_data=str(sft_data),
            sft_max_steps=2,
            rm_backbone=str(tiny_reward_model),
            rm_data=str(pair_data),
            rm_max_steps=4,
            ppo_config=str(ppo_config),
            ppo_steps=1,
            **kw,  # type: ignore[arg-type]
        )

    return make


def test_pipeline_hands_outputs_on_and_skips_finished_stages(
    pipeline_config: Callable[..., PipelineConfig],
    ppo_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict] = []

    def fake_ppo_job(model, rewards, config, output_dir, run_id="", overrides=()):  # noqa: ANN001
        calls.append(
            {"model": model, "rewards": rewards, "config": config, "overrides": list(overrides)}
        )
        (output_dir / run_id).mkdir(parents=True)
        return main_job.PPOJobResult(0, output_dir / run_id, 0.1)

    monkeypatch.setattr(main_job, "run_ppo_job", fake_ppo_job)
    out = tmp_path / "pipe"
    config = pipeline_config(vader_weight=0.25)
    result = run_pipeline(config)

    assert result.ran == ["sft", "rm", "ppo"] and result.code == 0
    (call,) = calls
    assert call["model"] == str(out / "sft")  # PPOConfig.model_name and the policy's --model
    assert call["config"] == ppo_config and "run.steps=1" in call["overrides"]
    rm, vader = call["rewards"]
    assert rm.args[:4] == ["reward", "serve", "--backend", "hf-classifier"]
    assert rm.args[rm.args.index("--model") + 1] == str(out / "rm")
    assert rm.args[rm.args.index("--input") + 1] == "prompt+response"
    assert rm.weight == 1.0
    assert vader.args[3] == "vader" and vader.weight == 0.25
    assert (out / "ppo" / PPO_DONE).is_file()

    # Everything finished: nothing reruns.
    stamp = (out / "sft" / "stage.json").stat().st_mtime_ns
    assert run_pipeline(config).ran == []
    assert len(calls) == 1 and (out / "sft" / "stage.json").stat().st_mtime_ns == stamp

    # A new reward model makes the PPO run stale; SFT stays.
    (out / "rm" / "stage.json").unlink()
    with pytest.raises(FileExistsError, match="--force"):
        run_pipeline(config)  # an unfinished folder is not replaced without --force
    shutil.rmtree(out / "rm")
    assert run_pipeline(config).ran == ["rm", "ppo"]

    # --force reruns every stage.
    forced = pipeline_config(force=True)
    assert run_pipeline(forced).ran == ["sft", "rm", "ppo"]
    assert (out / "sft" / "stage.json").stat().st_mtime_ns != stamp
    assert len(calls) == 3 and len(calls[-1]["rewards"]) == 1  # no VADER without its weight


@pytest.mark.slow
def test_pipeline_end_to_end_across_processes(
    pipeline_config: Callable[..., PipelineConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SFT and RM in this process, then the policy (on the SFT folder), reward (on the RM
    folder) and trainer services as processes for one PPO step."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the services' processes inherit these
    monkeypatch.setenv("RLHF_THREADS", "1")
    out = tmp_path / "pipe"
    config = pipeline_config()
    result = run_pipeline(config)

    assert result.code == 0 and result.ran == ["sft", "rm", "ppo"]
    run_dir = out / "ppo" / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    assert "env/reward/rm" in metrics[0] and math.isfinite(metrics[0]["env/reward_mean"])
    policy_log = (run_dir / "logs" / "policy.log").read_text()
    assert str(out / "sft") in policy_log  # the policy service served the SFT folder
    assert str(out / "rm") in (run_dir / "logs" / "rm.log").read_text()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "policy" / "config.json").is_file()
    done = json.loads((out / "ppo" / PPO_DONE).read_text())
    assert done["policy"] == str(out / "sft") and done["reward_model"] == str(out / "rm")
