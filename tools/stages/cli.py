"""`rlhf sft`, `rlhf rm` and `rlhf pipeline`.

Import-light (no torch here, nor in the stage modules' top levels): `rlhf --help` imports every
command module. Defaults come from the stages' config dataclasses, so they are stated once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tools.stages.pipeline import PipelineConfig
from tools.stages.reward_model import INPUTS, RMStageConfig
from tools.stages.sft import SFTStageConfig

_EXPECTED = (FileExistsError, FileNotFoundError, ValueError, RuntimeError)
"""Errors with a message that says what to fix: printed as one line, no traceback."""


def _training_flags(parser: argparse.ArgumentParser, d: SFTStageConfig | RMStageConfig) -> None:
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
        parser.add_argument(
            "--model",
            default=d.model,
            help=f"base causal LM folder or hub name (default: {d.model})",
        )
        _training_flags(parser, d)
        parser.add_argument(
            "--no-chat-template",
            action="store_true",
            help="train plain prompt/completion strings as they are, without the chat template",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from tools.stages.sft import train_sft

        config = SFTStageConfig(
            model=args.model,
            data=args.data,
            output=args.output,
            epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            device=args.device,
            chat_template=not args.no_chat_template,
            force=args.force,
        )
        return _run("sft", lambda: train_sft(config))


class Rm:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = "Reward-model training with TRL's RewardTrainer."
        d = RMStageConfig()
        parser.add_argument(
            "--model",
            default=d.model,
            help=f"backbone folder or hub name (default: {d.model}, the embedded MiniLM)",
        )
        _training_flags(parser, d)
        parser.add_argument(
            "--eval-fraction",
            type=float,
            default=d.eval_fraction,
            help=f"pairs held out for the accuracy figure (default {d.eval_fraction})",
        )
        parser.add_argument(
            "--input",
            default=d.input,
            choices=INPUTS,
            help=f"what the model reads, as the reward service's --input (default: {d.input})",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from tools.stages.reward_model import train_reward_model

        config = RMStageConfig(
            model=args.model,
            data=args.data,
            output=args.output,
            epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_length=args.max_length,
            eval_fraction=args.eval_fraction,
            seed=args.seed,
            device=args.device,
            input=args.input,
            force=args.force,
        )
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

        config = PipelineConfig(
            output=args.output,
            base_model=args.base_model,
            sft_data=args.sft_data,
            sft_epochs=args.sft_epochs,
            sft_max_steps=args.sft_max_steps,
            rm_backbone=args.rm_backbone,
            rm_data=args.rm_data,
            rm_epochs=args.rm_epochs,
            rm_max_steps=args.rm_max_steps,
            ppo_config=args.config,
            ppo_steps=args.ppo_steps,
            overrides=list(args.set),
            vader_weight=args.vader_weight,
            seed=args.seed,
            device=args.device,
            force=args.force,
        )
        codes: list[int] = []
        failed = _run("pipeline", lambda: codes.append(run_pipeline(config).code))
        return failed or codes[0]
