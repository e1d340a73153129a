"""TLS and mutual TLS for every server and client, with gRPC's own credentials.

One `TlsConfig` per process (flags --tls-cert, --tls-key, --tls-ca, --tls-server-name,
--allow-plaintext and their RLHF_* variables). A server with a certificate and key serves TLS;
with a CA too it accepts only clients whose certificate that CA signed (mutual TLS), which is
what gives `rlhf.auth` a verified identity. A client with a CA verifies the server's
certificate against it and checks the server's name (the address's host, or --tls-server-name).

Without any TLS setting traffic is plaintext, allowed only on loopback (127.0.0.0/8, ::1,
localhost, unix sockets) unless --allow-plaintext says otherwise; then a warning is logged.
Bad files are refused up front with the flag and the path named, never at the first handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rlhf.config.security import TlsConfig
from rlhf.flag_files import read_flag_file

__all__ = [
    "TlsConfig",
    "TlsConfigError",
    "add_port",
    "check_plaintext",
    "is_loopback",
    "open_secure_channel",
    "server_credentials",
]

log = logging.getLogger("rlhf.tls")

TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"
"""Channel option: the name the client checks the server's certificate against."""

LOOPBACK_NAMES = ("localhost",)


class TlsConfigError(ValueError):
    """TLS settings that cannot work; the message names the flag and the file."""


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of a TlsConfig's files, read and checked."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _read(field: str, path: str) -> bytes:
    return read_flag_file(_flag(field), path, "a PEM file", TlsConfigError)


def _certificates(field: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"{_flag(field)} {path}: no PEM certificate in the file") from None
    now = datetime.datetime.now(datetime.UTC)
    if field == "tls_cert" and certs[0].not_valid_after_utc < now:
        raise TlsConfigError(
            f"{_flag(field)} {path}: expired on {certs[0].not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    return certs


def _check_key(cfg: TlsConfig, cert: x509.Certificate, key_data: bytes) -> None:
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TlsConfigError(
            f"--tls-key {cfg.tls_key}: the key is encrypted; give an unencrypted key"
        ) from None
    except ValueError:
        raise TlsConfigError(f"--tls-key {cfg.tls_key}: no PEM private key in the file") from None
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TlsConfigError(
            f"--tls-key {cfg.tls_key} is not the key of --tls-cert {cfg.tls_cert} (mismatched pair)"
        )


def load_files(cfg: TlsConfig) -> TlsFiles:
    """Reads and checks the files: readable, PEM, unexpired certificate, key matching it."""
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        given, missing = (
            ("--tls-cert", "--tls-key") if cfg.tls_cert else ("--tls-key", "--tls-cert")
        )
        raise TlsConfigError(f"{given} is set but {missing} is not: give both or neither")
    cert = key = ca = None
    if cfg.tls_cert:
        cert, key = _read("tls_cert", cfg.tls_cert), _read("tls_key", cfg.tls_key)
        _check_key(cfg, _certificates("tls_cert", cfg.tls_cert, cert)[0], key)
    if cfg.tls_ca:
        ca = _read("tls_ca", cfg.tls_ca)
        _certificates("tls_ca", cfg.tls_ca, ca)
    return TlsFiles(cert=cert, key=key, ca=ca)


def address_host(address: str) -> str:
    """The host of a gRPC address: "h:p", "[v6]:p", "dns:///h:p", "ipv4:h:p", "unix:..."."""
    if address.startswith(("unix:", "unix-abstract:")):
        return "unix"
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
            break
    if address.startswith("["):
        return address[1 : address.find("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_loopback(address: str) -> bool:
    host = address_host(address)
    if host == "unix" or host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(address: str, cfg: TlsConfig, role: str) -> str | None:
    """Whether `address` may carry plaintext. None when TLS is on or the address is loopback;
    the warning to log when plaintext off loopback was asked for; raises TlsConfigError else.

    `role` is "serve" or "connect to", for the messages.
    """
    if cfg.enabled or is_loopback(address):
        return None
    if not cfg.allow_plaintext:
        raise TlsConfigError(
            f"refusing to {role} {address} in plaintext: off loopback, traffic must be TLS "
            "(--tls-cert/--tls-key/--tls-ca); pass --allow-plaintext to accept plaintext anyway"
        )
    return f"plaintext gRPC ({role} {address}): anyone on the network can read and forge calls"


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS server credentials, or None for plaintext. With a CA: mutual TLS (client
    certificates required and verified against it)."""
    if not cfg.enabled:
        return None
    if cfg.tls_server_name:
        raise TlsConfigError("--tls-server-name is a client setting; a server has no use for it")
    files = load_files(cfg)
    if files.cert is None or files.key is None:
        raise TlsConfigError("a server needs --tls-cert and --tls-key to serve TLS")
    return grpc.ssl_server_credentials(
        [(files.key, files.cert)],
        root_certificates=files.ca,
        require_client_auth=files.ca is not None,
    )


def add_port(server: grpc.Server, address: str, cfg: TlsConfig) -> int:
    """Binds `address` ("host:port", port 0 = any) with TLS or, where allowed, plaintext;
    returns the port bound. A bind failure raises OSError naming the address.

    A port already in use is only detected when the server was made with the channel option
    ("grpc.so_reuseport", 0); gRPC's default shares the port with the other process.
    """
    credentials = server_credentials(cfg)
    warning = check_plaintext(address, cfg, "serve")
    if warning:
        log.warning(warning)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {address}: port in use, or no such address on this host")
    return port


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (verifying the server against --tls-ca, presenting --tls-cert
    when set), or None for plaintext."""
    if not cfg.enabled:
        if cfg.tls_server_name:
            raise TlsConfigError("--tls-server-name needs TLS: give --tls-ca (and a client cert)")
        return None
    files = load_files(cfg)
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
    )


def channel_options(cfg: TlsConfig) -> list[tuple[str, Any]]:
    """Channel options TLS adds: the server name override, only when one is set."""
    return [(TARGET_NAME_OVERRIDE, cfg.tls_server_name)] if cfg.tls_server_name else []


def open_secure_channel(
    address: str, cfg: TlsConfig, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to `address`: TLS per `cfg`, or plaintext where check_plaintext allows it."""
    credentials = channel_credentials(cfg)
    if credentials is None:
        warning = check_plaintext(address, cfg, "connect to")
        if warning:
            log.warning(warning)
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials, options=[*options, *channel_options(cfg)])
