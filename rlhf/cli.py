"""The `rlhf` command. Each service adds its own subcommands from its `cli` module, which stays
import-light (no torch) so `rlhf --help` is instant; the heavy imports happen in `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

# (command words, module with configure(parser) and run(args) -> int, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (
        ("policy", "serve"),
        "services.policy.cli",
        "serve a causal LM for generation (PolicyService)",
    ),
    (("reward", "serve"), "services.reward.cli", "serve a reward backend (RewardService)"),
    (
        ("models", "prepare"),
        "rlhf.models_cli",
        "convert the embedded default policy into the cache",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n")[0])
    groups: dict[str, argparse._SubParsersAction] = {}
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for words, module, help_text in COMMANDS:
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        mod = importlib.import_module(module)
        mod.configure(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
