"""The `rlhf` command: every subcommand of the three services and their tooling, in one parser.

Each subcommand lives in a module with `configure(parser)` and `run(args) -> int`, which stays
import-light (no torch) so `rlhf --help` is instant; the heavy imports happen in `run`. A
command that fails for a reason the user can fix raises `CommandError`: this entry point prints
its one line and exits 1, for every command alike.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from rlhf.command_errors import CommandError

DESCRIPTION = (
    "RLHF (SFT -> reward model -> PPO) as three gRPC services: a policy that generates, reward "
    "services that score, and a trainer that runs PPO against them. Serve each one, drive PPO "
    "runs on a trainer, train the SFT and reward-model stages, deploy on Kubernetes."
)
EPILOG = (
    "Every flag --some-name of a service can also be set as the variable RLHF_SOME_NAME. "
    "`rlhf COMMAND --help` shows a command's flags and their defaults."
)

# (command words, "module" or "module:Class" with configure(parser) and run(args), what it does)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("policy", "serve"), "services.policy.cli", "serve a causal LM for generation"),
    (("reward", "serve"), "services.reward.cli", "serve a reward backend (RewardService)"),
    (("trainer", "serve"), "services.trainer.cli", "serve the PPO trainer's control API"),
    (("train",), "services.trainer.api.commands:Train", "run PPO (on a trainer service, or here)"),
    (("status",), "services.trainer.api.commands:Status", "show a run on a trainer service"),
    (("watch",), "services.trainer.api.commands:Watch", "follow a run with a progress bar"),
    (("stop",), "services.trainer.api.commands:Stop", "stop a run after its step in progress"),
    (("swap-reward",), "services.trainer.api.commands:SwapReward", "point a run at other rewards"),
    (("models", "prepare"), "rlhf.models_cli", "convert the embedded default policy"),
    (("health",), "rlhf.health_cli", "exit 0 if a service's gRPC health is SERVING"),
    (("certs",), "rlhf.certs_cli", "make a development CA and TLS certificates"),
    (("sft",), "tools.stages.cli:Sft", "supervised fine-tuning (TRL SFTTrainer)"),
    (("rm",), "tools.stages.cli:Rm", "train a reward model (TRL RewardTrainer)"),
    (("pipeline",), "tools.stages.cli:Pipeline", "SFT -> reward model -> PPO"),
    (("k8s", "render"), "tools.k8s.cli:Render", "render a deploy/k8s overlay (kustomize)"),
    (("k8s", "apply"), "tools.k8s.cli:Apply", "server-side apply an overlay to a cluster"),
    (("k8s", "status"), "tools.k8s.cli:Status", "pods' readiness and the run's step"),
    (("k8s", "swap-reward"), "tools.k8s.cli:SwapReward", "repoint a run on the cluster"),
]

GROUPS = {
    "policy": "the policy service: a causal LM that generates (PolicyService)",
    "reward": "reward services: score (prompt, response) pairs (RewardService)",
    "trainer": "the trainer service: runs PPO against the policy and reward services",
    "models": "the model cache: the embedded default policy",
    "k8s": "Kubernetes: render and apply the deploy/k8s overlays, follow and repoint runs",
}
"""What each group of two-word commands (`rlhf GROUP COMMAND`) is about."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Writes each flag's default after its help, unless the help says it already or there is
    none worth showing (an empty string, None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "(default" in text or default is None or default is False or default in ("", []):
            return text
        return super()._get_help_string(action)


def sentence(phrase: str) -> str:
    """A command's short help as a description: capitalised, with a full stop."""
    return phrase[0].upper() + phrase[1:] + ("" if phrase.endswith(".") else ".")


def _load(target: str) -> Any:
    """A module, or a class in it, that has configure(parser) and run(args) -> int."""
    module, _, attr = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    groups: dict[str, Any] = {}
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for words, target, help_text in COMMANDS:
        parent = top
        if len(words) == 2:
            if words[0] not in groups:
                about = GROUPS[words[0]]
                group = top.add_parser(
                    words[0], help=about, description=sentence(about), formatter_class=HelpFormatter
                )
                groups[words[0]] = group.add_subparsers(
                    dest="subcommand", required=True, metavar="COMMAND"
                )
            parent = groups[words[0]]
        sub = parent.add_parser(
            words[-1],
            help=help_text,
            description=sentence(help_text),
            formatter_class=HelpFormatter,
        )
        _load(target).configure(sub)
        sub.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, ["rlhf", args.command, getattr(args, "subcommand", None)]))
    try:
        return int(_load(args._target).run(args) or 0)
    except CommandError as err:
        print(f"{name}: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`rlhf status | head`): stop quietly, as other command-line
        # tools do; stdout goes to /dev/null so the interpreter's final flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
