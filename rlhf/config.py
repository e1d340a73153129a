"""Command-line flags that environment variables can also set.

Every flag `--some-name` of a service can be given as `RLHF_SOME_NAME` instead (containers and
Kubernetes set env vars); a flag on the command line wins over the variable, which wins over
the default. The prefix keeps clear of the `<SERVICE>_PORT` variables Kubernetes injects.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from rlhf.server import ServerConfig

ENV_PREFIX = "RLHF_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_env_argument(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """parser.add_argument(flag, ...) whose default comes from RLHF_<FLAG> when that is set."""
    name = env_name(flag)
    if name in os.environ:
        raw = os.environ[name]
        if kwargs.get("action") == "store_true":
            kwargs["default"] = raw.lower() in ("1", "true", "yes", "on")
        else:
            convert = kwargs.get("type", str)
            kwargs["default"] = convert(raw)
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {name}]".strip()
    parser.add_argument(flag, **kwargs)


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    add_env_argument(parser, "--host", default="0.0.0.0", help="interface to bind")
    add_env_argument(parser, "--port", type=int, default=default_port, help="TCP port (0: any)")
    add_env_argument(parser, "--workers", type=int, default=8, help="threads serving calls")
    add_env_argument(
        parser, "--grace-s", type=float, default=30.0, help="seconds to drain calls on SIGTERM"
    )
    add_env_argument(parser, "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, workers=args.workers, grace_s=args.grace_s)
