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

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf.defaults import DEFAULT_POLICY_MODEL
from tools.stages.common import STAGE_FILE, write_json
from tools.stages.reward_model import DEFAULT_BACKBONE
from tools.stages.reward_model import DEMO_DATA as RM_DEMO_DATA
from tools.stages.sft import DEMO_DATA as SFT_DEMO_DATA

DEFAULT_PPO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "default.yaml"
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
    ppo_config: str = str(DEFAULT_PPO_CONFIG)
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
    import json

    from tools import main_job
    from tools.stages.reward_model import RMStageConfig, train_reward_model
    from tools.stages.sft import SFTStageConfig, train_sft

    root = Path(config.output)
    sft_dir, rm_dir, ppo_dir = root / "sft", root / "rm", root / "ppo"
    ran: list[str] = []

    if _stage_needed("sft", sft_dir, sft_dir / STAGE_FILE, config.force):
        train_sft(
            SFTStageConfig(
                model=config.base_model,
                data=config.sft_data,
                output=str(sft_dir),
                epochs=config.sft_epochs,
                max_steps=config.sft_max_steps,
                seed=config.seed,
                device=config.device,
                force=True,  # _stage_needed has decided that what is there is replaced
            )
        )
        ran.append("sft")

    if _stage_needed("rm", rm_dir, rm_dir / STAGE_FILE, config.force):
        train_reward_model(
            RMStageConfig(
                model=config.rm_backbone,
                data=config.rm_data,
                output=str(rm_dir),
                epochs=config.rm_epochs,
                max_steps=config.rm_max_steps,
                seed=config.seed,
                device=config.device,
                force=True,
            )
        )
        ran.append("rm")

    run_dir = ppo_dir / PPO_RUN_ID
    if ran:
        # New SFT weights or a new reward model make an earlier PPO run stale.
        rerun_ppo = True
        if ppo_dir.exists():
            print(f"ppo: {ppo_dir} is older than the new {' and '.join(ran)} output, rerun")
    else:
        rerun_ppo = _stage_needed("ppo", ppo_dir, ppo_dir / PPO_DONE, config.force)
    if rerun_ppo:
        if ppo_dir.exists():
            shutil.rmtree(ppo_dir)
        # The reward model is served reading what it was trained on (stage.json's input).
        rm_input = json.loads((rm_dir / STAGE_FILE).read_text())["config"]["input"]
        rewards = [
            main_job.RewardServiceSpec(
                "rm",
                [
                    "reward",
                    "serve",
                    "--backend",
                    "hf-classifier",
                    "--model",
                    str(rm_dir),
                    "--input",
                    rm_input,
                    "--name",
                    "rm",
                ],
            )  # fmt: skip
        ]
        if config.vader_weight > 0:
            rewards.append(
                main_job.RewardServiceSpec(
                    "vader",
                    ["reward", "serve", "--backend", "vader", "--name", "vader"],
                    config.vader_weight,
                )
            )
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
        ran.append("ppo")
        if result.code != 0:
            print(f"ppo: the run failed; see {run_dir} and its logs/", flush=True)
            return PipelineResult(sft_dir, rm_dir, run_dir, ran, result.code)
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
    final = run_dir / "checkpoints"
    latest = final / "latest"
    if latest.is_file():
        final = final / latest.read_text().strip() / "policy"
        print(f"pipeline: final policy in {final} (serve it: rlhf policy serve --model {final})")
    return PipelineResult(sft_dir, rm_dir, run_dir, ran, 0)
