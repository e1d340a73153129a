"""Start-up of the real services: settings that cannot work (a port in use, no way to authorise
the mutating RPCs, plaintext off loopback) stop a service before it serves, with the flag to
set; and the security flags every service and client command has, from their dataclasses."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.auth import AuthConfigError
from rlhf.cli import main
from rlhf.config import add_server_arguments, server_config
from rlhf.config.security import AuthConfig, TlsConfig
from rlhf.config.server import ServerConfig
from rlhf.defaults import LOOPBACK
from rlhf.server import GrpcService, build_server
from rlhf.tls import TlsConfigError
from services.policy.server import PolicyServicer
from services.policy.server import servicers as policy_servicers
from services.reward.backends.vader import VaderBackend
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from services.trainer.api.service import TrainerServicer
from services.trainer.api.service import servicers as trainer_servicers
from services.trainer.config import TrainerServiceConfig

REPO = Path(__file__).resolve().parents[1]


def _trainer(tmp: Path, config: ServerConfig) -> GrpcService:
    servicer = TrainerServicer(TrainerServiceConfig(output_dir=str(tmp)))
    return build_server("trainer", trainer_servicers(servicer), config)


# --- settings that cannot work stop a service before it serves ---------------------------------
def test_a_port_in_use_is_a_start_up_error() -> None:
    first = build_server(
        "reward", reward_servicers(RewardServicer(ScoreSettings(), VaderBackend()))
    )
    try:
        taken = ServerConfig(host=LOOPBACK, port=first.port)
        second = GrpcService("reward", taken)
        second.add(*reward_servicers(RewardServicer(ScoreSettings(), VaderBackend()))[0])
        with pytest.raises(OSError, match=f"cannot bind {LOOPBACK}:{first.port}: port in use"):
            second.start()
    finally:
        first.stop(0)


@pytest.mark.parametrize("kind", ["policy", "trainer"])
def test_no_way_to_authorise_refuses_to_start(kind: str, tmp_path: Path) -> None:
    registrations = (
        policy_servicers(PolicyServicer())
        if kind == "policy"
        else trainer_servicers(TrainerServicer(TrainerServiceConfig(output_dir=str(tmp_path))))
    )
    with pytest.raises(
        AuthConfigError, match="--allow-identity .* --auth-token-file, or --no-auth"
    ):
        build_server(kind, registrations, ServerConfig(host=LOOPBACK, port=0))


def test_the_process_says_which_flags_to_set() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "trainer", "serve", "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "rlhf trainer serve: nobody could call StartRun, StopRun, SetRewardEndpoints: give "
        "--allow-identity (with mutual TLS) and/or --auth-token-file, or --no-auth for local "
        "development"
    )


def test_reward_needs_no_credentials_and_no_auth_warns(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    reward = build_server(
        "reward", reward_servicers(RewardServicer(ScoreSettings(), VaderBackend()))
    )
    reward.stop(0)  # no mutating RPC: open reads need no credential settings
    with caplog.at_level(logging.WARNING, logger="rlhf.server"):
        trainer = _trainer(
            tmp_path, ServerConfig(host=LOOPBACK, port=0, auth=AuthConfig(no_auth=True))
        )
        trainer.stop(0)
    assert "authorisation is off (--no-auth)" in caplog.text


def test_plaintext_off_loopback_refuses_to_start() -> None:
    open_to_all = ServerConfig(host="0.0.0.0", port=0)
    registrations = reward_servicers(RewardServicer(ScoreSettings(), VaderBackend()))
    with pytest.raises(TlsConfigError, match="refusing to serve 0.0.0.0:0 in plaintext"):
        build_server("reward", registrations, open_to_all)


# --- the flags -----------------------------------------------------------------------------------
SERVER_FLAGS = [
    "--host", "--tls-cert", "--tls-key", "--tls-ca", "--allow-plaintext", "--allow-identity",
    "--auth-token-file", "--read-access", "--no-auth",
]  # fmt: skip
CLIENT_FLAGS = ["--tls-cert", "--tls-key", "--tls-ca", "--tls-server-name", "--token-file"]


def _flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> set[str]:
    """The options `rlhf ARGV --help` lists."""
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return {word.rstrip(",") for word in capsys.readouterr().out.split() if word.startswith("--")}


@pytest.mark.parametrize("service", ["policy", "reward", "trainer"])
def test_every_service_has_the_security_flags(
    service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = _flags([service, "serve"], capsys)
    assert set(SERVER_FLAGS) <= flags and "--tls-server-name" not in flags
    assert ("--token-file" in flags) == (service == "trainer")


@pytest.mark.parametrize("command", ["train", "status", "watch", "stop", "swap-reward", "health"])
def test_every_client_has_the_client_flags(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert set(CLIENT_FLAGS) <= _flags([command], capsys)


def test_security_flags_and_variables_fill_server_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_TLS_CA", "/env/ca.pem")
    monkeypatch.setenv("RLHF_ALLOW_IDENTITY", "trainer")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, default_port=1)
    config = server_config(
        parser.parse_args(["--tls-cert", "c.pem", "--read-access", "identity", "--no-auth"])
    )
    assert config.host == LOOPBACK
    assert config.tls == TlsConfig(tls_cert="c.pem", tls_ca="/env/ca.pem")
    assert config.auth == AuthConfig(allow_identity="trainer", read_access="identity", no_auth=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--read-access", "everyone"])
