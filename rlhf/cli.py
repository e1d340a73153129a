"""The `rlhf` command. Each service adds its own subcommands from its `cli` module, which stays
import-light (no torch) so `rlhf --help` is instant; the heavy imports happen in `run`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# (command words, "module" or "module:Class" with configure(parser) and run(args), help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("policy", "serve"), "services.policy.cli", "serve a causal LM for generation"),
    (("reward", "serve"), "services.reward.cli", "serve a reward backend (RewardService)"),
    (("trainer", "serve"), "services.trainer.cli", "serve the PPO trainer's control API"),
    (("train",), "services.trainer.api.commands:Train", "run PPO (on a trainer service, or here)"),
    (("status",), "services.trainer.api.commands:Status", "show a run on a trainer service"),
    (("watch",), "services.trainer.api.commands:Watch", "follow a run with a progress bar"),
    (("swap-reward",), "services.trainer.api.commands:SwapReward", "point a run at other rewards"),
    (("models", "prepare"), "rlhf.models_cli", "convert the embedded default policy"),
    (("health",), "rlhf.health_cli", "exit 0 if a service's gRPC health is SERVING"),
    (("sft",), "tools.stages.cli:Sft", "supervised fine-tuning (TRL SFTTrainer)"),
    (("rm",), "tools.stages.cli:Rm", "train a reward model (TRL RewardTrainer)"),
    (("pipeline",), "tools.stages.cli:Pipeline", "SFT -> reward model -> PPO"),
    (("k8s", "render"), "tools.k8s.cli:Render", "render a deploy/k8s overlay (kustomize)"),
    (("k8s", "apply"), "tools.k8s.cli:Apply", "server-side apply an overlay to a cluster"),
    (("k8s", "status"), "tools.k8s.cli:Status", "pods' readiness and the run's step"),
    (("k8s", "swap-reward"), "tools.k8s.cli:SwapReward", "repoint a run on the cluster"),
]


def _load(target: str) -> Any:
    """A module, or a class in it, that has configure(parser) and run(args) -> int."""
    module, _, attr = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n")[0])
    groups: dict[str, Any] = {}
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for words, target, help_text in COMMANDS:
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        _load(target).configure(sub)
        sub.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(_load(args._target).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
