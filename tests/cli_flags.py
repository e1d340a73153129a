"""The real command lines, for tests that check deployment files against them."""

from __future__ import annotations

import argparse

from rlhf.cli import build_parser
from rlhf.config import env_name


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
