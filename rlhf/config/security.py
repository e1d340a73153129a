"""Security settings of servers and clients: TLS files, who may call what, the token a client
presents. grpc-free (the flags are built from these fields for `--help`); `rlhf.tls` and
`rlhf.auth` put them to work.

Servers take TlsConfig (less --tls-server-name) and AuthConfig inside ServerConfig; clients
take ClientConfig: TlsConfig and --token-file. Every field is a flag and an RLHF_* variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.defaults import LOOPBACK

READ_OPEN, READ_IDENTITY = "open", "identity"
READ_ACCESS_MODES = (READ_OPEN, READ_IDENTITY)

LOCAL_HOSTS = ("localhost", LOOPBACK)
"""Names every development service certificate carries by default (`rlhf certs --hosts`):
clients on the same host reach a service by either."""

TLS_GROUP = "TLS"
AUTH_GROUP = "authorisation"


@dataclass(frozen=True)
class TlsConfig:
    """How one process protects its gRPC traffic. Empty everywhere: plaintext (loopback only)."""

    tls_cert: str = ""
    """PEM certificate (chain) this process presents: a server's certificate, and a client's
    certificate for mutual TLS. Needs --tls-key."""
    tls_key: str = ""
    """PEM private key (unencrypted, e.g. mounted from a Secret) of --tls-cert."""
    tls_ca: str = ""
    """PEM CA bundle. Server: accept only clients whose certificate one of these CAs signed
    (mutual TLS). Client: the CAs that may sign the server's certificate."""
    tls_server_name: str = ""
    """Client only: the name the server's certificate must carry when it differs from the host
    in the address (connecting by IP, through a port-forward). Empty: the address's host."""
    allow_plaintext: bool = False
    """Allow plaintext gRPC off loopback (a warning is logged). Never needed on 127.0.0.1."""

    @property
    def enabled(self) -> bool:
        """Whether any TLS file is set (then traffic is TLS, never plaintext)."""
        return bool(self.tls_cert or self.tls_key or self.tls_ca)


@dataclass(frozen=True)
class AuthConfig:
    """Who may call this service's RPCs."""

    allow_identity: str = ""
    """Comma-separated client-certificate identities (e.g. trainer,admin) allowed to call the
    mutating RPCs; needs mutual TLS (--tls-ca). Certificate names, not host names."""
    auth_token_file: str = ""
    """File with the bearer token(s) a caller may present instead (`authorization: Bearer
    <token>`): one per line, at least 16 characters; two lines while rotating."""
    read_access: str = field(default=READ_OPEN, metadata={"choices": READ_ACCESS_MODES})
    """Read-only RPCs (Generate, Score, GetInfo, GetRun, WatchRun): "open" to any caller that
    passed TLS, or "identity" to require an authorised identity like the mutating ones."""
    no_auth: bool = False
    """Turn authorisation off: every caller may call every RPC (local development only)."""

    def identities(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.allow_identity.split(",") if p.strip())


@dataclass(frozen=True)
class ClientConfig:
    """How a client reaches a service: TLS, and the bearer token it presents."""

    tls: TlsConfig = field(default_factory=TlsConfig, metadata={"group": TLS_GROUP})
    """TLS of this client's channels."""
    token_file: str = field(default="", metadata={"group": AUTH_GROUP})
    """File whose first token (one line, # comments skipped) this client presents as
    `authorization: Bearer <token>`. Empty: none (a client certificate may authorise it)."""


SERVER_ONLY_TLS = frozenset({"tls_server_name"})
"""TlsConfig fields a server has no flag for (clients only)."""
