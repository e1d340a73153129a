"""rlhf.tls against real gRPC servers on 127.0.0.1: mutual TLS, server-name checks, the
plaintext rule and clear errors for bad files."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from rlhf.tls import (
    TlsConfig,
    TlsConfigError,
    add_port,
    check_plaintext,
    is_loopback,
    open_secure_channel,
    server_credentials,
)
from tests.secure_echo import Pki, call, health_check, make_pki, serve

HANDSHAKE_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _refused(address: str, cfg: TlsConfig) -> grpc.RpcError:
    with open_secure_channel(address, cfg) as channel, pytest.raises(grpc.RpcError) as info:
        health_check(channel, HANDSHAKE_TIMEOUT_S)
    return info.value


def test_mutual_tls_accepts_a_client_the_ca_signed(pki: Pki) -> None:
    with serve(pki.tls("policy")) as port:
        with open_secure_channel(f"127.0.0.1:{port}", pki.tls("trainer")) as channel:
            assert health_check(channel) == "SERVING"
            assert call(channel, "Write", b"hi", timeout=5) == b"ok:hi"
        # A client-only certificate works as well, and the host name localhost is in the SANs.
        with open_secure_channel(f"localhost:{port}", pki.tls("admin")) as channel:
            assert health_check(channel) == "SERVING"


def test_mutual_tls_refuses_a_client_without_certificate(pki: Pki) -> None:
    with serve(pki.tls("policy")) as port:
        no_cert = TlsConfig(tls_ca=str(pki.main / "ca.pem"))
        err = _refused(f"127.0.0.1:{port}", no_cert)
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_another_ca_signed(pki: Pki) -> None:
    with serve(pki.tls("policy")) as port:
        err = _refused(f"127.0.0.1:{port}", pki.stranger())
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_server_refuses_plaintext_clients(pki: Pki) -> None:
    with serve(pki.tls("policy")) as port:
        err = _refused(f"127.0.0.1:{port}", TlsConfig())
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_client_verifies_the_servers_name(pki: Pki) -> None:
    with serve(pki.tls("policy")) as port:
        address = f"127.0.0.1:{port}"
        with open_secure_channel(address, pki.tls("trainer", tls_server_name="policy")) as ch:
            assert health_check(ch) == "SERVING"
        # The policy's certificate does not name "reward": the client must hang up.
        err = _refused(address, pki.tls("trainer", tls_server_name="reward"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_another_ca_signed(pki: Pki) -> None:
    server_cfg = TlsConfig(
        tls_cert=str(pki.other / "policy.pem"),
        tls_key=str(pki.other / "policy.key"),
        tls_ca=str(pki.main / "ca.pem"),
    )
    with serve(server_cfg) as port:
        err = _refused(f"127.0.0.1:{port}", pki.tls("trainer"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_server_without_ca_serves_tls_to_clients_without_certificates(pki: Pki) -> None:
    server_cfg = TlsConfig(
        tls_cert=str(pki.main / "policy.pem"), tls_key=str(pki.main / "policy.key")
    )
    with serve(server_cfg) as port:
        client = TlsConfig(tls_ca=str(pki.main / "ca.pem"))
        with open_secure_channel(f"127.0.0.1:{port}", client) as channel:
            assert health_check(channel) == "SERVING"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:5",
        "127.0.0.53:5",
        "[::1]:5",
        "localhost:5",
        "unix:/tmp/x.sock",
        "dns:///localhost:5",
        "ipv4:127.0.0.1:5",
    ],
)
def test_plaintext_is_allowed_on_loopback(address: str) -> None:
    assert is_loopback(address)
    assert check_plaintext(address, TlsConfig(), "serve") is None


@pytest.mark.parametrize(
    "address", ["0.0.0.0:5", "[::]:5", "10.0.0.7:5", "policy:50051", "dns:///policy:5"]
)
def test_plaintext_off_loopback_needs_explicit_consent(address: str) -> None:
    with pytest.raises(TlsConfigError, match="--allow-plaintext"):
        check_plaintext(address, TlsConfig(), "serve")
    warning = check_plaintext(address, TlsConfig(allow_plaintext=True), "serve")
    assert warning is not None and address in warning


def test_plaintext_bind_off_loopback_is_refused_before_binding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(1))
    with pytest.raises(TlsConfigError, match="refusing to serve 0.0.0.0:0 in plaintext"):
        add_port(server, "0.0.0.0:0", TlsConfig())
    with caplog.at_level(logging.WARNING, logger="rlhf.tls"):
        assert add_port(server, "0.0.0.0:0", TlsConfig(allow_plaintext=True)) > 0
    assert "plaintext gRPC (serve 0.0.0.0:0)" in caplog.text
    server.stop(0)
    with pytest.raises(TlsConfigError, match="refusing to connect to policy:1"):
        open_secure_channel("policy:1", TlsConfig())


def test_a_port_in_use_is_a_bind_error() -> None:
    options = [("grpc.so_reuseport", 0)]
    first = grpc.server(futures.ThreadPoolExecutor(1), options=options)
    second = grpc.server(futures.ThreadPoolExecutor(1), options=options)
    port = add_port(first, "127.0.0.1:0", TlsConfig())
    with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}: port in use"):
        add_port(second, f"127.0.0.1:{port}", TlsConfig())
    first.stop(0)
    second.stop(0)


def test_bad_files_are_named_with_their_flag(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = (str(pki.main / n) for n in ("policy.pem", "policy.key", "ca.pem"))
    missing = str(tmp_path / "nope.pem")
    cases = {
        "--tls-cert " + missing + ": no such file": TlsConfig(missing, key, ca),
        "--tls-ca " + missing + ": no such file": TlsConfig(cert, key, missing),
        f"--tls-key {tmp_path}: is a folder": TlsConfig(cert, str(tmp_path), ca),
        f"--tls-cert {key}: no PEM certificate": TlsConfig(key, key, ca),
        f"--tls-key {cert}: no PEM private key": TlsConfig(cert, cert, ca),
        "--tls-cert is set but --tls-key is not": TlsConfig(cert, "", ca),
        "--tls-key is set but --tls-cert is not": TlsConfig("", key, ca),
        "a server needs --tls-cert and --tls-key": TlsConfig(tls_ca=ca),
        "--tls-server-name is a client setting": TlsConfig(cert, key, ca, "policy"),
    }
    for message, cfg in cases.items():
        with pytest.raises(TlsConfigError) as info:
            server_credentials(cfg)
        assert message in str(info.value), (message, str(info.value))


def test_mismatched_key_and_certificate_are_refused(pki: Pki) -> None:
    cert, other_key = str(pki.main / "policy.pem"), str(pki.main / "trainer.key")
    cfg = TlsConfig(cert, other_key, str(pki.main / "ca.pem"))
    with pytest.raises(TlsConfigError, match="is not the key of --tls-cert .*policy.pem"):
        server_credentials(cfg)
    with pytest.raises(TlsConfigError, match="mismatched pair"):
        open_secure_channel("127.0.0.1:1", cfg)


def test_expired_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from rlhf.certs import cert_pem, key_pem, new_key

    ca_key = serialization.load_pem_private_key((pki.main / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki.main / "ca.pem").read_bytes())
    key = new_key()
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (tmp_path / "old.pem").write_bytes(cert_pem(cert))
    (tmp_path / "old.key").write_bytes(key_pem(key))
    cfg = TlsConfig(str(tmp_path / "old.pem"), str(tmp_path / "old.key"))
    with pytest.raises(TlsConfigError, match="old.pem: expired on 2020-01-02"):
        server_credentials(cfg)
