"""`rlhf models prepare`: convert the embedded SmolLM2 GGUF into the model cache."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="convert again even if cached")


def run(args: argparse.Namespace) -> int:
    from rlhf.logs import setup_logging
    from rlhf.models import prepare_default_policy

    setup_logging("models")
    print(prepare_default_policy(force=args.force))
    return 0
