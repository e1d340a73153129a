"""ServerConfig: where and how a service listens (grpc-free, so `--help` needs no grpc)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from rlhf.config.checks import at_least, choice_problems
from rlhf.config.flags import add_dataclass_arguments, from_args
from rlhf.config.sections import check
from rlhf.defaults import POLICY_PORT

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class ServerConfig:
    """Where and how a service listens. Flags and RLHF_* env vars of the same names set it."""

    host: str = "0.0.0.0"
    """Interface to bind; 0.0.0.0 for all, 127.0.0.1 for loopback only."""
    port: int = POLICY_PORT
    """TCP port; 0 picks a free one (the chosen port is logged and returned by start())."""
    workers: int = 8
    """Threads serving unary calls (and health checks) at once."""
    max_streams: int = 64
    """Streaming calls (WatchRun, UpdateWeights, ...) open at once, on threads of their own
    (RESOURCE_EXHAUSTED beyond): streams never take the `workers` threads."""
    grace_s: float = 30.0
    """Seconds in-flight calls get to finish after SIGTERM."""
    log_level: str = "INFO"
    """Lowest level of the JSON log lines on stderr: DEBUG, INFO, WARNING, ERROR (any case)."""

    def __post_init__(self) -> None:
        check(self, "server settings")

    def problems(self) -> list[str]:
        found = at_least(self, 0, "port", "grace_s") + at_least(self, 1, "workers", "max_streams")
        return found + choice_problems("log_level", self.log_level.upper(), LOG_LEVELS)


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """--host, --port (default: the service's own), --workers, --grace-s, --log-level."""
    add_dataclass_arguments(parser, ServerConfig, defaults={"port": default_port})


def server_config(args: argparse.Namespace) -> ServerConfig:
    return from_args(ServerConfig, args)
