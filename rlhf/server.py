"""Server bootstrap shared by the three services.

Every service gets the same things: a thread-pool gRPC server whose streams have threads of
their own (rlhf.stream_limit), requests decoded and size-capped by the services
(rlhf.handlers), TLS or mutual TLS (rlhf.tls; plaintext only on loopback or when asked for),
the one authorisation interceptor (rlhf.auth: mutating RPCs need an authorised identity),
grpc.health.v1 (NOT_SERVING until its model is loaded, SERVING after, NOT_SERVING again while
it drains; always public), server reflection, a graceful stop on SIGTERM/SIGINT that lets
in-flight calls finish, and a C heap that gives large freed tensors back (rlhf.heap).

Settings that cannot work stop the process before it serves, with the flag to fix: a port in
use, unreadable certificates, mutating RPCs nobody could be authorised to call.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rlhf.auth import AuthConfigError, AuthInterceptor, auth_interceptor, service_access_table
from rlhf.command_errors import CommandError
from rlhf.config.server import ServerConfig
from rlhf.defaults import LOOPBACK
from rlhf.heap import tune_for_tensors
from rlhf.stream_limit import StreamLimit, pool_size
from rlhf.tls import TlsConfigError, add_port

log = logging.getLogger("rlhf.server")

MiB = 1024 * 1024
# The transport's outer bound on one message; each method's own, smaller cap is checked on the
# raw bytes by rlhf.handlers, which answers with the method's sizes.
MAX_MESSAGE_BYTES = 64 * MiB
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# gRPC shares a port with another process by default (SO_REUSEPORT): a second server on a port
# in use would start and "serve" while the first one answers. Off, binding fails instead.
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]


class Registration(NamedTuple):
    """One servicer and how to put it on a server: what a service's `servicers()` returns."""

    add_fn: Callable[[Any, grpc.Server], None]
    """Registers the servicer, e.g. reward_pb2_grpc.add_RewardServiceServicer_to_server."""
    servicer: Any
    full_name: str
    """The gRPC service's full name (rlhf.protocol), for health and reflection."""


class Readiness:
    """Lets servicers refuse calls (UNAVAILABLE) until the service has loaded its model."""

    def __init__(self) -> None:
        self._ready = threading.Event()

    def set(self) -> None:
        self._ready.set()

    def is_set(self) -> bool:
        return self._ready.is_set()


class GrpcService:
    """One process's gRPC server: its servicers, health, reflection and graceful shutdown."""

    def __init__(self, name: str, config: ServerConfig) -> None:
        """Raises AuthConfigError for authorisation settings that cannot work."""
        self.name = name
        self.config = config
        self.auth = self._interceptor(config)
        self.server = grpc.server(
            _thread_pool(name, config),
            options=SERVER_OPTIONS,
            # Authorisation first: a refused stream never takes one of the streams' threads.
            interceptors=[*([self.auth] if self.auth else []), *_limits(config)],
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self.port = 0
        self._stopped = threading.Event()

    def add(
        self, add_fn: Callable[[Any, grpc.Server], None], servicer: Any, full_name: str
    ) -> None:
        """Registers a servicer; `full_name` is e.g. "rlhf.v1.PolicyService"."""
        add_fn(servicer, self.server)
        self.service_names.append(full_name)

    @staticmethod
    def _interceptor(config: ServerConfig) -> AuthInterceptor | None:
        # The table covers the project's three services; start() checks those served.
        interceptor = auth_interceptor(
            config.auth, service_access_table(), mutual_tls=bool(config.tls.tls_ca)
        )
        if interceptor is None:
            log.warning("authorisation is off (--no-auth): every caller may call every RPC")
        return interceptor

    def start(self) -> int:
        """Binds and starts serving; health reports NOT_SERVING until set_serving().

        Raises AuthConfigError when a mutating RPC served here could never be authorised,
        TlsConfigError for TLS settings that cannot work, OSError when the address cannot be
        bound (a port in use)."""
        if self.auth is not None:
            self.auth.check_reachable(self.service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        self.port = add_port(self.server, address, self.config.tls)
        self.server.start()
        log.info("listening", extra={"address": f"{self.config.host}:{self.port}"})
        return self.port

    def set_serving(self) -> None:
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"services": self.service_names})

    def stop(self, grace_s: float | None = None) -> None:
        """Stops taking new calls, lets in-flight ones finish within the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace_s is None else grace_s
        log.info("draining", extra={"grace_s": grace})
        self.server.stop(grace).wait()
        log.info("stopped")

    def wait_for_termination(self) -> None:
        """Blocks until SIGTERM or SIGINT, then stops gracefully. Call from the main thread."""
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal received", extra={"signal": signal.Signals(signum).name})
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop.wait(0.5) and not self._stopped.is_set():
            pass
        self.stop()

    def _set_health(self, status: int) -> None:
        for name in ["", *self.service_names]:
            self.health.set(name, status)


def _thread_pool(name: str, config: ServerConfig) -> futures.ThreadPoolExecutor:
    """Threads for `workers` unary calls plus `max_streams` streams (rlhf.stream_limit)."""
    size = pool_size(config.workers, config.max_streams)
    return futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix=name)


def _limits(config: ServerConfig) -> list[grpc.ServerInterceptor]:
    """The interceptors that keep streams to their share of the pool."""
    return [StreamLimit(config.max_streams)]


def build_server(
    name: str,
    registrations: Iterable[Registration],
    config: ServerConfig | None = None,
    serving: bool = True,
) -> GrpcService:
    """A started GrpcService with these servicers: bound (read `.port`; the default config is
    loopback port 0, a free port) with health SERVING, or NOT_SERVING until `set_serving()`
    when `serving` is False (a model still loading). Stop it with `stop()`.

    The default config is plaintext on loopback with authorisation on, so a policy or trainer
    service refuses to start without credentials; tests whose subject is not security pass
    `ServerConfig(auth=AuthConfig(no_auth=True))`.

    run_service is this plus the load and the wait for SIGTERM; tests and benchmarks use it
    directly with `servicers(...)` of the service they start.
    """
    service = GrpcService(name, config or ServerConfig(host=LOOPBACK, port=0))
    for add_fn, servicer, full_name in registrations:
        service.add(add_fn, servicer, full_name)
    service.start()
    if serving:
        service.set_serving()
    return service


def run_service(
    name: str,
    config: ServerConfig,
    registrations: Iterable[Registration],
    load: Callable[[], None],
) -> None:
    """The main of every service: start NOT_SERVING, load, report SERVING, serve until SIGTERM.

    A `load` that raises stops the process with the error logged: a service whose model does
    not load never serves (there is no fallback). Security or bind settings that cannot work
    end it before that, as a CommandError naming the flag to fix.
    """
    tune_for_tensors()  # before any model loads or thread starts (rlhf.heap)
    try:
        service = build_server(name, registrations, config, serving=False)
    except (AuthConfigError, TlsConfigError, OSError) as err:
        log.error("cannot start", extra={"reason": str(err)})
        raise CommandError(str(err)) from None
    try:
        load()
    except Exception:
        log.exception("failed to load; shutting down")
        service.stop(grace_s=0)
        raise SystemExit(1) from None
    service.set_serving()
    service.wait_for_termination()
