"""The real command lines, for tests that check deployment files against them."""

from __future__ import annotations

import argparse
import os
from unittest import mock

from rlhf.cli import build_parser
from rlhf.config import env_name, from_args, server_config
from services.policy.config import PolicyServiceConfig
from services.reward.config import RewardServiceConfig
from services.trainer.config import TrainerServiceConfig

SERVICE_SETTINGS = {
    "policy": PolicyServiceConfig,
    "reward": RewardServiceConfig,
    "trainer": TrainerServiceConfig,
}


def subparser(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command that args name, e.g. [policy, serve] or [sft, ...]."""
    for word in args:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            break
        parser = actions[0].choices[word]
    return parser


def env_flags(args: list[str]) -> dict[str, argparse.Action]:
    """RLHF_* variable -> the flag it sets, for the `rlhf` command line `args`.

    `args` must be a valid command line (argparse's SystemExit otherwise)."""
    parser = build_parser()
    parser.parse_args(args)
    sub = subparser(parser, args)
    return {
        env_name(option): action
        for action in sub._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def settings(args: list[str], env: dict[str, str]) -> list[object]:
    """Parses `args` as a container with `env` would, and for `<service> serve` builds its
    validated settings: a bad value fails here as it would fail the process (SystemExit from
    argparse, ValueError from a config's validation)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        parsed = build_parser().parse_args(args)
    if args[-1:] != ["serve"]:
        return [parsed]
    return [server_config(parsed), from_args(SERVICE_SETTINGS[args[0]], parsed)]
