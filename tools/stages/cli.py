"""`rlhf sft`, `rlhf rm` and `rlhf pipeline`.

Import-light (no torch here, nor in the stage modules' top levels): `rlhf --help` imports every
command module. Defaults come from the stages' config dataclasses, so they are stated once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from rlhf.defaults import REWARD_INPUT_MODES
from tools.stages.pipeline import PipelineConfig
from tools.stages.reward_model import RMStageConfig
from tools.stages.sft import SFTStageConfig

_EXPECTED = (FileExistsError, FileNotFoundError, ValueError, RuntimeError)
"""Errors with a message that says what to fix: printed as one line, no traceback."""
_Config = TypeVar("_Config", SFTStageConfig, RMStageConfig, PipelineConfig)


def _training_flags(
    parser: argparse.ArgumentParser, d: SFTStageConfig | RMStageConfig, model_help: str
) -> None:
    parser.add_argument("--model", default=d.model, help=model_help)
    parser.add_argument("--data", default=d.data, help="JSONL data (default: the demo set)")
    parser.add_argument("--output", default=d.output, help=f"model folder (default: {d.output})")
    parser.add_argument("--epochs", type=float, default=d.epochs, help=f"default {d.epochs:g}")
    parser.add_argument(
        "--max-steps", type=int, default=d.max_steps, help="optimizer steps; > 0 overrides epochs"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=d.learning_rate, help=f"default {d.learning_rate}"
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}"
    )
    parser.add_argument(
        "--max-length", type=int, default=d.max_length, help=f"tokens, default {d.max_length}"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    parser.add_argument("--device", default=d.device, help="cpu or cuda (float32)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")


def _from_args(config_class: type[_Config], args: argparse.Namespace, **named: Any) -> _Config:
    """A stage's config from its flags: each field from the flag of its name, except those
    given in `named` (flags named otherwise than their field)."""
    names = [f.name for f in fields(config_class) if f.name not in named]
    return config_class(**{name: getattr(args, name) for name in names}, **named)


def _run(command: str, work: Callable[[], Any]) -> int:
    try:
        work()
    except _EXPECTED as err:
        print(f"rlhf {command}: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


class Sft:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = "Supervised fine-tuning with TRL's SFTTrainer."
        d = SFTStageConfig()
        _training_flags(parser, d, f"base causal LM folder or hub name (default: {d.model})")
        parser.add_argument(
            "--no-chat-template",
            action="store_true",
            help="train plain prompt/completion strings as they are, without the chat template",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from tools.stages.sft import train_sft

        config = _from_args(SFTStageConfig, args, chat_template=not args.no_chat_template)
        return _run("sft", lambda: train_sft(config))


class Rm:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = "Reward-model training with TRL's RewardTrainer."
        d = RMStageConfig()
        model_help = f"backbone folder or hub name (default: {d.model}, the embedded MiniLM)"
        _training_flags(parser, d, model_help)
        parser.add_argument(
            "--eval-fraction",
            type=float,
            default=d.eval_fraction,
            help=f"pairs held out for the accuracy figure (default {d.eval_fraction})",
        )
        parser.add_argument(
            "--input",
            default=d.input,
            choices=REWARD_INPUT_MODES,
            help=f"what the model reads, as the reward service's --input (default: {d.input})",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from tools.stages.reward_model import train_reward_model

        config = _from_args(RMStageConfig, args)
        return _run("rm", lambda: train_reward_model(config))


class Pipeline:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = "SFT -> reward model -> PPO, each stage's output the next's input."
        d = PipelineConfig()
        add = parser.add_argument
        add("--output", default=d.output, help=f"root of the stages' outputs ({d.output})")
        add("--base-model", default=d.base_model, help=f"SFT's base model ({d.base_model})")
        add("--sft-data", default=d.sft_data, help="SFT JSONL (default: the demo set)")
        add("--sft-epochs", type=float, default=d.sft_epochs, help=f"default {d.sft_epochs:g}")
        add("--sft-max-steps", type=int, default=d.sft_max_steps, help="> 0 overrides epochs")
        add("--rm-backbone", default=d.rm_backbone, help=f"reward backbone ({d.rm_backbone})")
        add("--rm-data", default=d.rm_data, help="preference JSONL (default: the demo set)")
        add("--rm-epochs", type=float, default=d.rm_epochs, help=f"default {d.rm_epochs:g}")
        add("--rm-max-steps", type=int, default=d.rm_max_steps, help="> 0 overrides epochs")
        add("--config", default=d.ppo_config, help="PPO run config (default: configs/default.yaml)")
        add("--ppo-steps", type=int, default=d.ppo_steps, help="PPO steps (0: the config's)")
        add(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a PPO config field, e.g. --set generation.max_new_tokens=16",
        )
        add(
            "--vader-weight",
            type=float,
            default=d.vader_weight,
            help="> 0: add VADER sentiment as a second reward with this weight (the RM has 1)",
        )
        add("--seed", type=int, default=d.seed, help="seed of SFT and the reward model")
        add("--device", default=d.device, help="where SFT and the RM train: cpu or cuda")
        add("--force", action="store_true", help="rerun stages whose output exists")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from tools.stages.pipeline import run_pipeline

        config = _from_args(PipelineConfig, args, ppo_config=args.config, overrides=list(args.set))
        codes: list[int] = []
        failed = _run("pipeline", lambda: codes.append(run_pipeline(config).code))
        return failed or codes[0]
