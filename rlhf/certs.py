"""A development certificate authority and per-service certificates (`rlhf certs`).

Made with `cryptography` (EC P-256 keys, SHA-256 signatures); nothing shells out to openssl.

    rlhf certs --out certs --services policy,reward,trainer --clients trainer,admin \
        --hosts localhost,127.0.0.1 --domains rlhf.svc,rlhf.svc.cluster.local

writes into `certs/`:
- `ca.pem`, `ca.key`: the CA (reused when both already exist in the folder, so new
  certificates join the same trust); give `ca.pem` to every process as `--tls-ca`.
- `NAME.pem`, `NAME.key` per service: a server certificate whose subject alternative names are
  NAME itself, NAME.DOMAIN for each `--domains` entry (policy.rlhf.svc, ...), and every
  `--hosts` entry (DNS names and IP addresses shared by all services: localhost, 127.0.0.1).
  With the clientAuth usage it is the service's client certificate too (the trainer presents
  `trainer.pem` when it pushes weights to the policy service). A certificate name is refused
  in `--hosts`: every certificate would then carry that identity.
- `NAME.pem`, `NAME.key` per client: CN=NAME and a DNS name NAME, clientAuth usage only. The
  identity a server sees (and matches against `--allow-identity`) is NAME. A name given both as a
  service and a client gets the service certificate, which serves both roles.

Private keys are written with mode 0600. An existing key is never overwritten without `--force`.

Rotation:
- Leaf certificates: run the command again with `--force` for the names to renew (the CA in the
  folder is reused), roll the new NAME.pem/NAME.key out, restart each process.
- The CA: make a new CA in another folder, give every process a bundle of both CAs as `--tls-ca`
  (`cat old/ca.pem new/ca.pem > bundle.pem`; gRPC accepts several roots in one file), roll out
  certificates from the new CA, then drop the old CA from the bundle.

These are development and test certificates. In production a kept CA issues them (Kubernetes:
cert-manager `Certificate` resources into Secrets).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "ca"
"""File stem of the CA's certificate and key in the output folder."""

CA_COMMON_NAME = "rlhf-services development CA"

KEY_MODE = 0o600

# A name becomes a file name and a DNS name: lowercase DNS-label characters only.
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A host may also be dotted (policy.rlhf.svc.cluster.local) or an IP address.
HOST_PATTERN = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class CertError(ValueError):
    """A request `rlhf certs` refuses (bad name, existing key without --force)."""


@dataclass(frozen=True)
class Issued:
    """One certificate and key written to disk."""

    name: str
    cert_path: Path
    key_path: Path
    role: str
    """'ca', 'server' (serverAuth + clientAuth) or 'client' (clientAuth)."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise CertError(
            f"certificate name {name[:40]!r} must be lowercase letters, digits and '-' "
            "(it names the files and is the DNS name / identity in the certificate)"
        )
    if name == CA_NAME:
        raise CertError(f"{CA_NAME!r} is the CA's own file name; pick another name")
    return name


def check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not HOST_PATTERN.match(host):
        raise CertError(f"--hosts entry {host[:60]!r} is neither a DNS name nor an IP address")
    return host


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little so a peer whose clock lags by a few minutes accepts it.
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # order kept, duplicates dropped
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    hosts: list[str],
    server: bool,
    days: int,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate for `name` signed by the CA: CN=name, SANs name + hosts.

    Server certificates carry serverAuth and clientAuth (a service is also a client of the
    others); client certificates clientAuth only, so they cannot serve.
    """
    key = key or new_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(_san([name, *hosts]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Writes a key readable by its owner only, replacing the file in one rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)  # O_CREAT's mode is ignored when tmp already existed
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    cert_path, key_path = out / f"{CA_NAME}.pem", out / f"{CA_NAME}.key"
    if not cert_path.exists() and not key_path.exists():
        return None
    if not (cert_path.exists() and key_path.exists()):
        raise CertError(
            f"{out} has only one of {cert_path.name} and {key_path.name}; restore the other, "
            "or remove it to make a new CA"
        )
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertError(f"{key_path} is not the EC key of {cert_path}; remove both or fix them")
    return key, cert


def make_certs(
    out: Path,
    services: list[str],
    clients: list[str],
    hosts: list[str],
    days: int = 365,
    ca_days: int = 3650,
    force: bool = False,
    domains: Sequence[str] = (),
) -> list[Issued]:
    """Writes the CA (unless one is in `out`) and a certificate per service and client.

    Checks every name and every file first, so a refusal writes nothing.
    """
    services = [check_name(n) for n in services]
    clients = [check_name(n) for n in clients if n not in services]
    hosts = [check_host(h) for h in hosts]
    domains = [check_host(d) for d in domains]
    shared = sorted({h.split(".")[0] for h in hosts} & {*services, *clients})
    if shared:
        raise CertError(
            f"--hosts {','.join(shared)}: a certificate name in --hosts would put that identity "
            "in every certificate; each service's own name is in its certificate already"
        )
    if not services and not clients:
        raise CertError("nothing to make: give --services and/or --clients")
    for flag, value in (("--days", days), ("--ca-days", ca_days)):
        if value < 1:
            raise CertError(f"{flag} must be at least 1, got {value}")
    existing = [out / f"{n}.key" for n in [*services, *clients] if (out / f"{n}.key").exists()]
    if existing and not force:
        raise CertError(
            f"refusing to overwrite existing keys {', '.join(map(str, existing))}; "
            "pass --force to replace them (rotation)"
        )
    out.mkdir(parents=True, exist_ok=True)
    issued: list[Issued] = []
    ca = _load_ca(out)
    if ca is None:
        ca = make_ca(ca_days)
        issued.append(_write(out, CA_NAME, *ca, role="ca"))
    ca_key, ca_cert = ca
    for name in services:
        names = [f"{name}.{domain}" for domain in domains] + hosts
        issued.append(_write(out, name, *issue(ca_key, ca_cert, name, names, True, days), "server"))
    for name in clients:
        issued.append(_write(out, name, *issue(ca_key, ca_cert, name, [], False, days), "client"))
    return issued


def _write(
    out: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, role: str
) -> Issued:
    key_path, cert_path = out / f"{name}.key", out / f"{name}.pem"
    write_private(key_path, key_pem(key))
    cert_path.write_bytes(cert_pem(cert))
    return Issued(name, cert_path, key_path, role)
