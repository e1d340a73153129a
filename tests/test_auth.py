"""rlhf.auth's interceptor on real gRPC servers: strangers refused with the right code and a
message that says what is missing, allowed identities and tokens pass, health stays public,
every call shape is guarded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rlhf import auth
from rlhf.auth import (
    READ,
    WRITE,
    AuthConfig,
    AuthConfigError,
    AuthInterceptor,
    auth_interceptor,
    service_access_table,
)
from rlhf.certs import issue, make_certs
from rlhf.tls import TlsConfig, open_secure_channel
from tests.secure_echo import Echo, Pki, call, health_check, make_pki, path, serve

TOKEN = "s3cret-token-0123456789abcdef"
# Same length as TOKEN, differs in the last character only.
NEAR_TOKEN = TOKEN[:-1] + "g"
TABLE = {
    path("Write"): WRITE,
    path("Read"): READ,
    path("Upload"): WRITE,
    path("Watch"): WRITE,
    path("Chat"): WRITE,
}
GUARDED = ["Write", "Upload", "Watch", "Chat"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(f"# rotated in on Monday\n{TOKEN}\n\n")
    return str(path)


def _interceptor(token_file: str, mutual_tls: bool, **kwargs: str) -> AuthInterceptor:
    cfg = AuthConfig(auth_token_file=token_file, **kwargs)  # type: ignore[arg-type]
    interceptor = auth_interceptor(cfg, TABLE, mutual_tls=mutual_tls)
    assert interceptor is not None
    return interceptor


@pytest.fixture(scope="module")
def plain(token_file: str) -> Iterator[str]:
    """A plaintext loopback server that accepts the bearer token."""
    with serve(TlsConfig(), [_interceptor(token_file, mutual_tls=False)]) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def mtls(pki: Pki, token_file: str) -> Iterator[str]:
    """A mutual-TLS server that allows the identity "trainer" and the bearer token."""
    interceptor = _interceptor(token_file, mutual_tls=True, allow_identity="trainer")
    with serve(pki.tls("policy"), [interceptor]) as port:
        yield f"127.0.0.1:{port}"


def _code(channel: grpc.Channel, method: str, token: str | None = None) -> grpc.RpcError:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with pytest.raises(grpc.RpcError) as info:
        call(channel, method, timeout=5, metadata=metadata)
    return info.value


@pytest.mark.parametrize("method", GUARDED)
def test_plaintext_stranger_is_unauthenticated_with_what_is_missing(
    plain: str, method: str
) -> None:
    with grpc.insecure_channel(plain) as channel:
        err = _code(channel, method)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details().startswith(f"{method} needs an authorised identity: present")
    assert "--auth-token-file" in err.details()


@pytest.mark.parametrize("method", GUARDED)
def test_wrong_token_is_denied_and_never_echoed(plain: str, method: str) -> None:
    with grpc.insecure_channel(plain) as channel:
        for wrong in (NEAR_TOKEN, TOKEN[:-1], TOKEN + "x"):
            err = _code(channel, method, token=wrong)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "bearer token matches none" in err.details()
            assert TOKEN[:8] not in err.details()


def test_right_token_passes_every_shape(plain: str) -> None:
    metadata = [("authorization", f"Bearer {TOKEN}")]
    with grpc.insecure_channel(plain) as channel:
        assert call(channel, "Write", b"a", timeout=5, metadata=metadata) == b"ok:a"
        assert call(channel, "Upload", b"a", timeout=5, metadata=metadata) == b"got:3"
        assert call(channel, "Watch", b"a", timeout=5, metadata=metadata) == [b"a", b"a"]
        assert call(channel, "Chat", b"a", timeout=5, metadata=metadata) == [b"a"] * 3


def test_malformed_authorization_is_unauthenticated(plain: str) -> None:
    with grpc.insecure_channel(plain) as channel, pytest.raises(grpc.RpcError) as info:
        call(channel, "Write", timeout=5, metadata=[("authorization", f"Basic {TOKEN}")])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'Bearer <token>'" in info.value.details()
    assert TOKEN[:8] not in info.value.details()


def test_health_and_open_reads_need_no_credential(plain: str) -> None:
    with grpc.insecure_channel(plain) as channel:
        assert health_check(channel) == "SERVING"
        assert call(channel, "Read", b"r", timeout=5) == b"ok:r"


def test_token_is_compared_with_compare_digest(plain: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append(len(a))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    with grpc.insecure_channel(plain) as channel:
        assert _code(channel, "Write", token=NEAR_TOKEN).code() == grpc.StatusCode.PERMISSION_DENIED
    # Digests are compared, so the presented token's length does not shape the comparison.
    assert seen == [32]


def test_refused_upload_is_not_read(token_file: str) -> None:
    echo = Echo()
    with serve(TlsConfig(), [_interceptor(token_file, mutual_tls=False)], echo) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("Upload", "Chat"):
                assert _code(channel, method).code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = [("authorization", f"Bearer {TOKEN}")]
            assert call(channel, "Upload", timeout=5, metadata=metadata) == b"got:3"
    assert echo.requests_read == 3  # only the authorised upload's three messages


@pytest.mark.parametrize("method", GUARDED)
def test_certificate_outside_the_allow_list_is_denied(pki: Pki, mtls: str, method: str) -> None:
    with open_secure_channel(mtls, pki.tls("admin")) as channel:
        err = _code(channel, method)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "identity (admin) is not in --allow-identity" in err.details()
        assert _code(channel, method, token=NEAR_TOKEN).code() == grpc.StatusCode.PERMISSION_DENIED
        # The token is a second way in for a client whose certificate is not on the list.
        metadata = [("authorization", f"Bearer {TOKEN}")]
        call(channel, method, timeout=5, metadata=metadata)


@pytest.mark.parametrize("method", GUARDED)
def test_allowed_certificate_passes(pki: Pki, mtls: str, method: str) -> None:
    with open_secure_channel(mtls, pki.tls("trainer")) as channel:
        assert call(channel, method, b"w", timeout=5)
        assert health_check(channel) == "SERVING"


def test_other_ca_cannot_borrow_an_allowed_name(pki: Pki, mtls: str) -> None:
    # The stranger's certificate says "trainer" too, but its CA is not trusted.
    with open_secure_channel(mtls, pki.stranger("trainer")) as channel:
        assert _code(channel, "Write").code() == grpc.StatusCode.UNAVAILABLE


def test_long_identities_are_quoted_as_a_prefix(pki: Pki, tmp_path: Path, mtls: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from rlhf.certs import cert_pem, key_pem

    ca_key = serialization.load_pem_private_key((pki.main / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki.main / "ca.pem").read_bytes())
    long_name = "x" * 63
    key, cert = issue(ca_key, ca_cert, long_name, [], server=False, days=1)  # type: ignore[arg-type]
    (tmp_path / "long.pem").write_bytes(cert_pem(cert))
    (tmp_path / "long.key").write_bytes(key_pem(key))
    cfg = TlsConfig(str(tmp_path / "long.pem"), str(tmp_path / "long.key"), pki.tls("x").tls_ca)
    with open_secure_channel(mtls, cfg) as channel:
        err = _code(channel, "Write")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "x" * 40 + "..." in err.details() and "x" * 41 not in err.details()


def test_reads_can_require_an_identity(token_file: str) -> None:
    interceptor = _interceptor(token_file, mutual_tls=False, read_access="identity")
    with serve(TlsConfig(), [interceptor]) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert _code(channel, "Read").code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = [("authorization", f"Bearer {TOKEN}")]
            assert call(channel, "Read", b"r", timeout=5, metadata=metadata) == b"ok:r"
            assert health_check(channel) == "SERVING"


def test_methods_missing_from_the_table_are_guarded(token_file: str) -> None:
    interceptor = _interceptor(token_file, mutual_tls=False)
    assert interceptor.needs_identity("/rlhf.v1.Unlisted/Anything")
    assert not interceptor.needs_identity("/grpc.health.v1.Health/Check")


def test_settings_that_cannot_work_are_refused(tmp_path: Path, token_file: str) -> None:
    with pytest.raises(AuthConfigError, match="--allow-identity needs mutual TLS"):
        auth_interceptor(AuthConfig(allow_identity="trainer"), TABLE, mutual_tls=False)
    for host in ("localhost", "127.0.0.1", "::1"):
        with pytest.raises(AuthConfigError, match=f"--allow-identity {host}: host names"):
            auth_interceptor(AuthConfig(allow_identity=f"trainer,{host}"), TABLE, mutual_tls=True)
    no_way = auth_interceptor(AuthConfig(), TABLE, mutual_tls=True)
    assert no_way is not None
    with pytest.raises(AuthConfigError, match="nobody could call Write, Upload, Watch, Chat"):
        no_way.check_reachable()
    with pytest.raises(AuthConfigError, match="--read-access 'maybe'"):
        auth_interceptor(AuthConfig(auth_token_file=token_file, read_access="maybe"), TABLE, True)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(AuthConfigError, match="token 1 must be at least 16"):
        auth_interceptor(AuthConfig(auth_token_file=str(short)), TABLE, mutual_tls=False)
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(AuthConfigError, match="no token in the file"):
        auth_interceptor(AuthConfig(auth_token_file=str(empty)), TABLE, mutual_tls=False)
    with pytest.raises(AuthConfigError, match=f"--auth-token-file {tmp_path}/none: no such"):
        auth_interceptor(AuthConfig(auth_token_file=str(tmp_path / "none")), TABLE, False)
    assert auth_interceptor(AuthConfig(no_auth=True), TABLE, mutual_tls=False) is None
    # A service with read RPCs only (the reward service) needs no credential while reads are open.
    reads = auth_interceptor(AuthConfig(), {path("Read"): READ}, mutual_tls=False)
    assert reads is not None
    reads.check_reachable()


def test_project_table_guards_the_mutating_rpcs() -> None:
    from rlhf.protocol import POLICY_SERVICE, REWARD_SERVICE, TRAINER_SERVICE

    table = service_access_table()
    writes = sorted(m for m, level in table.items() if level == WRITE)
    assert writes == sorted(
        [
            f"/{POLICY_SERVICE}/UpdateWeights",
            f"/{TRAINER_SERVICE}/SetRewardEndpoints",
            f"/{TRAINER_SERVICE}/StartRun",
            f"/{TRAINER_SERVICE}/StopRun",
        ]
    )
    assert table[f"/{REWARD_SERVICE}/Score"] == READ
    assert table[f"/{TRAINER_SERVICE}/WatchRun"] == READ
    reward = service_access_table([REWARD_SERVICE])
    assert set(reward.values()) == {READ} and f"/{REWARD_SERVICE}/Score" in reward
    # One interceptor over the whole table: a reward-only server has nothing to guard while
    # reads are open, a policy server without credentials could never take UpdateWeights.
    interceptor = auth_interceptor(AuthConfig(), table, mutual_tls=False)
    assert interceptor is not None
    interceptor.check_reachable([REWARD_SERVICE])
    with pytest.raises(AuthConfigError, match="nobody could call UpdateWeights: give"):
        interceptor.check_reachable([POLICY_SERVICE])


def test_rotated_token_file_accepts_both_tokens(tmp_path: Path) -> None:
    both = tmp_path / "both"
    both.write_text(f"{TOKEN}\n{NEAR_TOKEN}\n")
    interceptor = _interceptor(str(both), mutual_tls=False)
    with serve(TlsConfig(), [interceptor]) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for token in (TOKEN, NEAR_TOKEN):
                metadata = [("authorization", f"Bearer {token}")]
                assert call(channel, "Write", b"t", timeout=5, metadata=metadata) == b"ok:t"


def test_certs_command_identities_match_the_allow_list(tmp_path: Path) -> None:
    # A client made by `rlhf certs --clients ops` is known by the name "ops" and nothing else.
    make_certs(tmp_path, ["policy"], ["ops"], ["localhost", "127.0.0.1"])
    interceptor = auth_interceptor(AuthConfig(allow_identity="ops"), TABLE, mutual_tls=True)
    assert interceptor is not None
    server = TlsConfig(
        str(tmp_path / "policy.pem"), str(tmp_path / "policy.key"), str(tmp_path / "ca.pem")
    )
    client = TlsConfig(
        str(tmp_path / "ops.pem"), str(tmp_path / "ops.key"), str(tmp_path / "ca.pem")
    )
    with serve(server, [interceptor]) as port:
        with open_secure_channel(f"127.0.0.1:{port}", client) as channel:
            assert call(channel, "Write", b"o", timeout=5) == b"ok:o"
