"""ServerConfig: where and how a service listens, and who may call it (grpc-free, so `--help`
needs no grpc)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TypeVar

from rlhf.config.checks import at_least, choice_problems
from rlhf.config.flags import add_dataclass_arguments, from_args
from rlhf.config.sections import check
from rlhf.config.security import AUTH_GROUP, SERVER_ONLY_TLS, TLS_GROUP, AuthConfig, TlsConfig
from rlhf.defaults import LOOPBACK, POLICY_PORT

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class ServerConfig:
    """Where and how a service listens. Flags and RLHF_* env vars of the same names set it."""

    host: str = LOOPBACK
    """Interface to bind: loopback only unless set (0.0.0.0 for all interfaces, as containers
    need); off loopback, traffic must be TLS or --allow-plaintext given."""
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
    tls: TlsConfig = field(default_factory=TlsConfig, metadata={"group": TLS_GROUP})
    """TLS of the listening port (its flags: --tls-cert, --tls-key, --tls-ca,
    --allow-plaintext)."""
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={"group": AUTH_GROUP})
    """Who may call which RPC (--allow-identity, --auth-token-file, --read-access, --no-auth)."""

    def __post_init__(self) -> None:
        check(self, "server settings")

    def problems(self) -> list[str]:
        found = at_least(self, 0, "port", "grace_s") + at_least(self, 1, "workers", "max_streams")
        return found + choice_problems("log_level", self.log_level.upper(), LOG_LEVELS)


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """--host, --port (default: the service's own), --workers, --grace-s, --log-level, and the
    TLS and authorisation flags."""
    add_dataclass_arguments(
        parser, ServerConfig, defaults={"port": default_port}, exclude=SERVER_ONLY_TLS
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    return from_args(ServerConfig, args)


def service_settings(
    args: argparse.Namespace, cls: type[T], command: str
) -> tuple[ServerConfig, T]:
    """A service's ServerConfig and its own settings (`cls`) from parsed flags; a bad value is
    printed as one line, `command: reason`, and exits 2 (argparse's code for bad usage)."""
    try:
        return server_config(args), from_args(cls, args)
    except ValueError as err:
        print(f"{command}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
