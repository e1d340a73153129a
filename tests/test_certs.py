"""`rlhf certs`: the files it writes, what the certificates say, and the overwrite rule."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from rlhf import certs_cli
from rlhf.certs import CertError, make_certs

HOSTS = "localhost,127.0.0.1,gateway.example"


def _run(out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    certs_cli.configure(parser)
    args = parser.parse_args(
        [
            "--out",
            str(out),
            "--services",
            "policy,reward,trainer",
            "--clients",
            "trainer,admin",
            "--hosts",
            HOSTS,
            "--domains",
            "rlhf.svc",
            *extra,
        ]
    )
    return certs_cli.run(args)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_writes_ca_services_and_clients_with_private_keys(tmp_path: Path) -> None:
    assert _run(tmp_path, "--days", "30") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [
        f"{n}.{ext}"
        for n in ("admin", "ca", "policy", "reward", "trainer")
        for ext in ("key", "pem")
    ]
    assert names == expected
    for key in tmp_path.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = _cert(tmp_path / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("policy", "reward", "trainer", "admin"):
        leaf = _cert(tmp_path / f"{name}.pem")
        leaf.verify_directly_issued_by(ca)
        assert leaf.subject.rfc4514_string() == f"CN={name}"
        lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30)


def test_service_certificates_name_their_hosts_and_serve_both_roles(tmp_path: Path) -> None:
    assert _run(tmp_path) == 0
    policy = _cert(tmp_path / "policy.pem")
    san = policy.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "policy",
        "policy.rlhf.svc",
        "localhost",
        "gateway.example",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert _usages(policy) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # "trainer" was asked for as a service and a client: one service certificate covers both.
    assert ExtendedKeyUsageOID.SERVER_AUTH in _usages(_cert(tmp_path / "trainer.pem"))


def test_client_certificates_cannot_serve(tmp_path: Path) -> None:
    assert _run(tmp_path) == 0
    admin = _cert(tmp_path / "admin.pem")
    assert _usages(admin) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    san = admin.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["admin"]


def test_refuses_to_overwrite_keys_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert _run(tmp_path) == 1
    assert "refusing to overwrite existing keys" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # --force rotates the leaves and keeps the CA, so peers keep trusting them.
    assert _run(tmp_path, "--force") == 0
    assert "CA: reused" in capsys.readouterr().out
    assert (tmp_path / "ca.pem").read_bytes() == before["ca.pem"]
    assert (tmp_path / "policy.key").read_bytes() != before["policy.key"]
    _cert(tmp_path / "policy.pem").verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    assert stat.S_IMODE((tmp_path / "policy.key").stat().st_mode) == 0o600


def test_new_names_join_an_existing_ca(tmp_path: Path) -> None:
    make_certs(tmp_path, ["policy"], [], ["localhost"])
    ca_before = (tmp_path / "ca.pem").read_bytes()
    issued = make_certs(tmp_path, [], ["ops"], [])
    assert [i.name for i in issued] == ["ops"]
    assert (tmp_path / "ca.pem").read_bytes() == ca_before


@pytest.mark.parametrize(
    ("services", "hosts", "message"),
    [
        (["../x"], [], "must be lowercase letters"),
        (["Policy"], [], "must be lowercase letters"),
        (["ca"], [], "the CA's own file name"),
        (["policy"], ["bad host!"], "neither a DNS name nor an IP"),
        (["policy", "trainer"], ["trainer"], "would put that identity in every certificate"),
        (["policy"], ["policy.rlhf.svc"], "would put that identity in every certificate"),
        ([], [], "nothing to make"),
    ],
)
def test_bad_requests_are_refused_and_write_nothing(
    tmp_path: Path, services: list[str], hosts: list[str], message: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(CertError, match=message):
        make_certs(out, services, [], hosts)
    assert not out.exists()


def test_a_bad_validity_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="--days must be at least 1, got 0"):
        make_certs(tmp_path / "out", ["policy"], [], [], days=0)
    assert not (tmp_path / "out").exists()


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    make_certs(tmp_path, ["policy"], [], [])
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertError, match="only one of ca.pem and ca.key"):
        make_certs(tmp_path, ["reward"], [], [])
