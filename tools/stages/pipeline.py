"""The whole of RLHF on the defaults: SFT -> reward model -> PPO, each stage's output the next
one's input.

    <output>/sft/   the SFT model folder: PPO's model_name and the policy service's --model
    <output>/rm/    the reward model: a reward service `--backend hf-classifier --model` it
                    (optionally with VADER beside it, weighted)
    <output>/ppo/   the PPO run (runs/<run>/ layout: metrics.jsonl, checkpoints/, logs/) and
                    completed.json once it has finished

A stage whose output is complete is skipped (say so, and use it); --force reruns every stage.
PPO also reruns when SFT or the reward model was retrained in this invocation, since its inputs
changed. The PPO stage is main_job.run_ppo_job, what `make run` does: policy, reward and
trainer services as separate processes, driven through the trainer's API.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.defaults import DEFAULT_POLICY_MODEL
from tools import main_job
from tools.stages.common import STAGE_FILE, write_json
from tools.stages.reward_model import DEFAULT_BACKBONE, RMStageConfig, train_reward_model
from tools.stages.reward_model import DEMO_DATA as RM_DEMO_DATA
from tools.stages.sft import DEMO_DATA as SFT_DEMO_DATA
from tools.stages.sft import SFTStageConfig, train_sft

PPO_RUN_ID = "run"
PPO_DONE = "completed.json"


@dataclass
class PipelineConfig:
    """`rlhf pipeline`: where to put the stages' outputs and what each stage starts from."""

    output: str = "runs/pipeline"
    """Root folder of the three stages' outputs."""
    base_model: str = DEFAULT_POLICY_MODEL
    """SFT's starting point (default: the embedded SmolLM2-135M-Instruct)."""
    sft_data: str = str(SFT_DEMO_DATA)
    """SFT data (default: the shipped demo set)."""
    sft_epochs: float = 2.0
    sft_max_steps: int = -1
    """> 0 overrides sft_epochs."""
    rm_backbone: str = DEFAULT_BACKBONE
    """Reward model's backbone (default: the embedded MiniLM)."""
    rm_data: str = str(RM_DEMO_DATA)
    """Preference pairs (default: the shipped demo set)."""
    rm_epochs: float = 2.0
    rm_max_steps: int = -1
    """> 0 overrides rm_epochs."""
    ppo_config: str = str(main_job.DEFAULT_CONFIG)
    """The PPO run's config YAML (default: configs/default.yaml, what `make run` uses)."""
    ppo_steps: int = 0
    """PPO steps; 0 keeps the config's run.steps."""
    overrides: list[str] = field(default_factory=list)
    """Further KEY=VALUE fields of the PPO config."""
    vader_weight: float = 0.0
    """> 0: VADER sentiment as a second reward source with this weight (the RM has weight 1)."""
    seed: int = 0
    """Seed of SFT and the reward model (PPO's is ppo.seed in its config)."""
    device: str = "cpu"
    """Where SFT and the reward model train (the services run on the CPU)."""
    force: bool = False
    """Rerun stages whose output exists."""


@dataclass
class PipelineResult:
    sft: Path
    rm: Path
    ppo_run: Path
    ran: list[str]
    """The stages that ran in this invocation (the others were skipped)."""
    code: int


def _stage_needed(name: str, folder: Path, done: Path, force: bool) -> bool:
    """Whether a stage runs: with --force, or when its output is not there. An output folder
    without its `done` file is not silently replaced: that takes --force."""
    if force:
        return True
    if done.is_file():
        print(f"{name}: {folder} exists, skipped (--force reruns it)", flush=True)
        return False
    if folder.exists():
        raise FileExistsError(
            f"{folder} exists but holds no finished {name} output; "
            "remove it or pass --force to rerun the stage"
        )
    return True


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    """Runs the stages in order, skipping those whose output is complete."""
    root = Path(config.output)
    sft_dir, rm_dir, ppo_dir = root / "sft", root / "rm", root / "ppo"
    run_dir = ppo_dir / PPO_RUN_ID
    ran: list[str] = []
    if _stage_needed("sft", sft_dir, sft_dir / STAGE_FILE, config.force):
        data, epochs, steps = config.sft_data, config.sft_epochs, config.sft_max_steps
        sft = _stage_fields(config, sft_dir, config.base_model, data, epochs, steps)
        train_sft(SFTStageConfig(**sft))
        ran.append("sft")
    if _stage_needed("rm", rm_dir, rm_dir / STAGE_FILE, config.force):
        data, epochs, steps = config.rm_data, config.rm_epochs, config.rm_max_steps
        rm = _stage_fields(config, rm_dir, config.rm_backbone, data, epochs, steps)
        train_reward_model(RMStageConfig(**rm))
        ran.append("rm")
    if _ppo_needed(ppo_dir, ran, config.force):
        code = _run_ppo(config, sft_dir, rm_dir, ppo_dir)
        ran.append("ppo")
        if code != 0:
            print(f"ppo: the run failed; see {run_dir} and its logs/", flush=True)
            return PipelineResult(sft_dir, rm_dir, run_dir, ran, code)
    _print_final_policy(run_dir / "checkpoints")
    return PipelineResult(sft_dir, rm_dir, run_dir, ran, 0)


def _stage_fields(
    config: PipelineConfig, output: Path, model: str, data: str, epochs: float, max_steps: int
) -> dict[str, Any]:
    """The fields of a training stage's config (SFTStageConfig, RMStageConfig) that the
    pipeline sets; the others keep the stage's defaults."""
    return dict(
        model=model,
        data=data,
        output=str(output),
        epochs=epochs,
        max_steps=max_steps,
        seed=config.seed,
        device=config.device,
        force=True,  # _stage_needed has decided that what is there is replaced
    )


def _ppo_needed(ppo_dir: Path, ran: list[str], force: bool) -> bool:
    if not ran:
        return _stage_needed("ppo", ppo_dir, ppo_dir / PPO_DONE, force)
    # New SFT weights or a new reward model make an earlier PPO run stale.
    if ppo_dir.exists():
        print(f"ppo: {ppo_dir} is older than the new {' and '.join(ran)} output, rerun")
    return True


def _reward_specs(config: PipelineConfig, rm_dir: Path) -> list[main_job.RewardServiceSpec]:
    """The reward services of the PPO run: the reward model, and VADER when it has a weight."""
    # The reward model is served reading what it was trained on (stage.json's input).
    rm_input = json.loads((rm_dir / STAGE_FILE).read_text())["config"]["input"]
    rm_args = ["reward", "serve", "--backend", "hf-classifier", "--model", str(rm_dir)]
    rewards = [main_job.RewardServiceSpec("rm", [*rm_args, "--input", rm_input, "--name", "rm"])]
    if config.vader_weight > 0:
        vader_args = ["reward", "serve", "--backend", "vader", "--name", "vader"]
        rewards.append(main_job.RewardServiceSpec("vader", vader_args, config.vader_weight))
    return rewards


def _run_ppo(config: PipelineConfig, sft_dir: Path, rm_dir: Path, ppo_dir: Path) -> int:
    """PPO as `make run` runs it, from the SFT folder against the reward model; on success
    completed.json and the run's summary. Returns the run's exit code."""
    if ppo_dir.exists():
        shutil.rmtree(ppo_dir)
    rewards = _reward_specs(config, rm_dir)
    overrides = list(config.overrides)
    if config.ppo_steps > 0:
        overrides.append(f"run.steps={config.ppo_steps}")
    print(f"ppo: policy {sft_dir}, reward model {rm_dir}", flush=True)
    result = main_job.run_ppo_job(
        str(sft_dir),
        rewards,
        Path(config.ppo_config),
        ppo_dir,
        run_id=PPO_RUN_ID,
        overrides=overrides,
    )
    if result.code != 0:
        return result.code
    run_dir = ppo_dir / PPO_RUN_ID
    ppo_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        ppo_dir / PPO_DONE,
        {
            "config": asdict(config),
            "policy": str(sft_dir),
            "reward_model": str(rm_dir),
            "run_dir": str(run_dir),
            "steps": len(result.metrics),
            "seconds": round(result.seconds, 1),
        },
    )
    if result.metrics:
        from tools.report import summarize

        print(summarize(result.metrics, run_dir / "summary.png", result.seconds))
    return 0


def _print_final_policy(checkpoints: Path) -> None:
    latest = checkpoints / "latest"
    if latest.is_file():
        final = checkpoints / latest.read_text().strip() / "policy"
        print(f"pipeline: final policy in {final} (serve it: rlhf policy serve --model {final})")
