"""Authorisation per RPC: one server interceptor shared by the three services.

Each RPC has an access level, given as data (full method name -> level):
- "public": anyone who reached the server (health and reflection, always, so probes work);
- "read": any caller while --read-access is "open", else an authorised identity;
- "write": an authorised identity (methods missing from the table are treated as "write").

An authorised identity is either a client certificate verified by mutual TLS whose identity
(a subject alternative name, or the common name) is in --allow-identity, or a bearer token
(`authorization: Bearer <token>` metadata) equal to one in --auth-token-file, compared in
constant time. Allow-list entries are certificate names (trainer, admin), never host names:
a service certificate also carries names like localhost.

Refusals: UNAUTHENTICATED when the call carries no credential, PERMISSION_DENIED when it
carries one that is not allowed; the message says what is missing. Tokens are never echoed;
certificate identities are quoted only as a short prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from rlhf.config.security import READ_ACCESS_MODES, READ_OPEN, AuthConfig
from rlhf.flag_files import read_flag_file
from rlhf.intercept import Behaviour, HandlerInterceptor, rewrap
from rlhf.logs import QUOTE_CHARS

log = logging.getLogger("rlhf.auth")

PUBLIC, READ, WRITE = "public", "read", "write"
ACCESS_LEVELS = (PUBLIC, READ, WRITE)

ALWAYS_PUBLIC_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
"""Probes and grpcurl must reach these whatever the table says."""

HOST_IDENTITIES = frozenset({"localhost"})
"""Names every service certificate carries (rlhf certs --hosts): never an identity."""

AUTHORIZATION = "authorization"
BEARER = "bearer"
MIN_TOKEN_CHARS = 16


class AuthConfigError(ValueError):
    """Authorisation settings that cannot work; the message names the flag."""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def method_path(service: str, method: str) -> str:
    """The full method name gRPC gives interceptors: "/rlhf.v1.PolicyService/UpdateWeights"."""
    return f"/{service}/{method}"


def _short(text: str) -> str:
    """A certificate identity cut to QUOTE_CHARS (bare: identities are listed in parentheses)."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def read_tokens(path: str, flag: str = "--auth-token-file") -> tuple[bytes, ...]:
    """The tokens in a token file (blank lines and # comments skipped); `flag` names the file
    in errors (a server's --auth-token-file, a client's --token-file)."""
    data = read_flag_file(flag, path, "a token file", AuthConfigError)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise AuthConfigError(f"{flag} {path}: tokens must be ASCII (gRPC metadata)") from None
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise AuthConfigError(f"{flag} {path}: no token in the file")
    for number, token in enumerate(tokens, 1):
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
            raise AuthConfigError(
                f"{flag} {path}: token {number} must be at least {MIN_TOKEN_CHARS} printable "
                "characters without spaces (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)"
            )
    return tuple(t.encode("ascii") for t in tokens)


def client_token(path: str) -> bytes:
    """The token a client presents: the first in its --token-file."""
    return read_tokens(path, "--token-file")[0]


def _digest(token: bytes) -> bytes:
    # Hashing first makes the comparison independent of the tokens' lengths too.
    return hashlib.sha256(token).digest()


class AuthInterceptor(HandlerInterceptor):
    """Checks every call against the access table before the servicer sees it."""

    def __init__(
        self,
        table: Mapping[str, str],
        identities: Iterable[str] = (),
        tokens: Iterable[bytes] = (),
        read_access: str = READ_OPEN,
    ) -> None:
        bad = {m: level for m, level in table.items() if level not in ACCESS_LEVELS}
        if bad:
            raise AuthConfigError(f"unknown access levels {bad}; use one of {ACCESS_LEVELS}")
        if read_access not in READ_ACCESS_MODES:
            raise AuthConfigError(
                f"--read-access {read_access[:QUOTE_CHARS]!r}: use one of {READ_ACCESS_MODES}"
            )
        self.table = dict(table)
        self.identities = frozenset(identities)
        self._digests = tuple(_digest(t) for t in tokens)
        self.read_open = read_access == READ_OPEN

    def level(self, method: str) -> str:
        service = method.split("/")[1] if method.startswith("/") else ""
        if service in ALWAYS_PUBLIC_SERVICES:
            return PUBLIC
        return self.table.get(method, WRITE)

    def needs_identity(self, method: str) -> bool:
        level = self.level(method)
        return level == WRITE or (level == READ and not self.read_open)

    def check_reachable(self, services: Iterable[str] | None = None) -> None:
        """Raises AuthConfigError when some guarded RPC of `services` (full names; None: every
        service in the table) has no way to be authorised: a server that can never accept its
        mutating RPCs is a configuration mistake, said at start-up."""
        served = None if services is None else set(services)
        guarded = [
            m
            for m in self.table
            if self.needs_identity(m) and (served is None or m.split("/")[1] in served)
        ]
        if guarded and not self.identities and not self._digests:
            names = ", ".join(m.rsplit("/", 1)[-1] for m in guarded)
            raise AuthConfigError(
                f"nobody could call {names}: give --allow-identity (with mutual TLS) and/or "
                "--auth-token-file, or --no-auth for local development"
            )

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if not self.needs_identity(method):
            return handler
        # Identities live in the call's auth context, which only a handler's context shows.
        return guard_handler(handler, lambda context: self.check(method, context))

    def check(self, method: str, context: grpc.ServicerContext) -> None:
        """Returns when the call carries an authorised identity; aborts it otherwise."""
        certified = peer_identities(context)
        token, malformed = bearer_token(context)
        if certified & self.identities:
            return
        if token is not None and self._token_matches(token):
            return
        name = method.rsplit("/", 1)[-1]
        if not certified and token is None:
            missing = f"{name} needs an authorised identity: present {self._ways()}"
            if malformed:
                missing += "; the authorization metadata must read 'Bearer <token>'"
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, method, missing)
        reasons = []
        if certified:
            # Certificate names before the host names every service certificate carries.
            ordered = sorted(certified, key=lambda i: (i in HOST_IDENTITIES or _is_ip(i), i))
            shown = ", ".join(_short(i) for i in ordered[:3])
            reasons.append(f"client certificate identity ({shown}) is not in --allow-identity")
        if token is not None:
            reasons.append("the bearer token matches none in --auth-token-file")
        detail = f"{name} refused: {'; '.join(reasons)}; present {self._ways()}"
        self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, method, detail)

    def _token_matches(self, token: bytes) -> bool:
        presented = _digest(token)
        matched = False
        for digest in self._digests:  # no early exit: time does not depend on which matched
            matched |= hmac.compare_digest(presented, digest)
        return matched

    def _ways(self) -> str:
        ways = []
        if self.identities:
            ways.append("a client certificate whose identity is in --allow-identity")
        if self._digests:
            ways.append("a bearer token (authorization: Bearer <token>, --auth-token-file)")
        return " or ".join(ways) or "nothing: no identity is authorised on this service"

    @staticmethod
    def _refuse(
        context: grpc.ServicerContext, code: grpc.StatusCode, method: str, detail: str
    ) -> NoReturn:
        log.warning(
            "call refused", extra={"rpc": method, "code": code.name, "peer": context.peer()}
        )
        context.abort(code, detail)


def peer_identities(context: grpc.ServicerContext) -> frozenset[str]:
    """The identities of the client certificate that TLS verified: its SANs and CN. Empty for
    plaintext and for TLS without a client certificate."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return frozenset()
    found = [*(context.peer_identities() or []), *auth.get("x509_common_name", [])]
    return frozenset(value.decode("utf-8", "replace") for value in found)


def bearer_token(context: grpc.ServicerContext) -> tuple[bytes | None, bool]:
    """(token, malformed): the call's bearer token, or None; malformed when an authorization
    entry was sent in another form."""
    for key, value in context.invocation_metadata() or ():
        if key != AUTHORIZATION:
            continue
        text = value if isinstance(value, str) else value.decode("ascii", "replace")
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != BEARER or not token.strip():
            return None, True
        return token.strip().encode("ascii", "replace"), False
    return None, False


def guard_handler(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    """The same handler with `check(context)` run before its behaviour, for all four shapes.

    Streaming requests are not read before the check passes (a refused upload costs nothing).
    """

    def unary(behaviour: Behaviour) -> Behaviour:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return behaviour(request, context)

        return run

    def streaming(behaviour: Behaviour) -> Behaviour:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            check(context)
            yield from behaviour(request, context)

        return run

    return rewrap(handler, unary, streaming)


def auth_interceptor(
    cfg: AuthConfig, table: Mapping[str, str], mutual_tls: bool
) -> AuthInterceptor | None:
    """The interceptor for a server, or None when `cfg.no_auth` (the caller logs a warning).

    Refuses an allow-list without mutual TLS and unreadable or weak token files. Once the
    server knows which services it serves, `check_reachable(services)` refuses guarded RPCs
    that nobody could be authorised to call.
    """
    if cfg.no_auth:
        return None
    identities = cfg.identities()
    if identities and not mutual_tls:
        raise AuthConfigError(
            "--allow-identity needs mutual TLS: give --tls-ca (and --tls-cert/--tls-key) so "
            "clients present certificates"
        )
    hostlike = sorted(i for i in identities if i in HOST_IDENTITIES or _is_ip(i))
    if hostlike:
        raise AuthConfigError(
            f"--allow-identity {','.join(hostlike)[:QUOTE_CHARS]}: host names and addresses are "
            "in every service certificate; list certificate names (e.g. trainer,admin)"
        )
    tokens = read_tokens(cfg.auth_token_file) if cfg.auth_token_file else ()
    return AuthInterceptor(table, identities, tokens, cfg.read_access)


WRITE_RPCS: dict[str, tuple[str, ...]] = {
    "PolicyService": ("UpdateWeights",),
    "TrainerService": ("StartRun", "StopRun", "SetRewardEndpoints"),
}
"""The mutating RPCs of this project's services; every other RPC of theirs is "read"."""


def service_access_table(services: Iterable[str] = ()) -> dict[str, str]:
    """The access level of every RPC of `services` (full names; default: the policy, reward
    and trainer services), read from the proto descriptors (a renamed mutating RPC fails here,
    never silently opens). Give a process only the services it serves, so a reward service
    (read RPCs only) needs no credential settings while reads are open."""
    from google.protobuf import descriptor_pool

    from rlhf.protocol import POLICY_SERVICE, REWARD_SERVICE, TRAINER_SERVICE

    table: dict[str, str] = {}
    for full_name in tuple(services) or (POLICY_SERVICE, REWARD_SERVICE, TRAINER_SERVICE):
        service = descriptor_pool.Default().FindServiceByName(full_name)
        writes = set(WRITE_RPCS.get(service.name, ()))
        missing = writes - {m.name for m in service.methods}
        if missing:
            raise AuthConfigError(f"{full_name} has no RPC {sorted(missing)} (auth.WRITE_RPCS)")
        for method in service.methods:
            table[method_path(full_name, method.name)] = WRITE if method.name in writes else READ
    return table


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Client side: adds `authorization: Bearer <token>` to every call of a channel (metadata,
    not call credentials, so it also works on a loopback plaintext channel)."""

    def __init__(self, token: bytes) -> None:
        self._entry = (AUTHORIZATION, f"Bearer {token.decode('ascii')}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, [*(details.metadata or ()), self._entry])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
