"""A tiny real gRPC server for the TLS and authorisation tests: grpc.health.v1 plus a bytes
echo service with one method of each shape, on 127.0.0.1 port 0.

It stands in for the project's services so these tests exercise rlhf.tls and rlhf.auth alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlhf.certs import make_certs
from rlhf.tls import TlsConfig, add_port

ECHO_SERVICE = "test.Echo"
# method -> (request streaming, response streaming)
SHAPES = {
    "Write": (False, False),
    "Read": (False, False),
    "Upload": (True, False),
    "Watch": (False, True),
    "Chat": (True, True),
}


def path(method: str) -> str:
    return f"/{ECHO_SERVICE}/{method}"


@dataclass
class Echo:
    """The echo service's behaviour; `requests_read` counts messages the servicer consumed."""

    requests_read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _count(self, requests: Iterator[bytes]) -> list[bytes]:
        items = []
        for item in requests:
            with self.lock:
                self.requests_read += 1
            items.append(item)
        return items

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(request: bytes, _context: grpc.ServicerContext) -> bytes:
            return b"ok:" + request

        def upload(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
            return b"got:%d" % len(self._count(requests))

        def watch(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from (request, request)

        def chat(requests: Iterator[bytes], _context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from self._count(requests)

        return grpc.method_handlers_generic_handler(
            ECHO_SERVICE,
            {
                "Write": grpc.unary_unary_rpc_method_handler(unary),
                "Read": grpc.unary_unary_rpc_method_handler(unary),
                "Upload": grpc.stream_unary_rpc_method_handler(upload),
                "Watch": grpc.unary_stream_rpc_method_handler(watch),
                "Chat": grpc.stream_stream_rpc_method_handler(chat),
            },
        )


@contextmanager
def serve(
    tls: TlsConfig, interceptors: Sequence[grpc.ServerInterceptor] = (), echo: Echo | None = None
) -> Iterator[int]:
    """A started server on 127.0.0.1:0 with health SERVING; yields the port it bound."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([(echo or Echo()).handler()])
    port = add_port(server, "127.0.0.1:0", tls)
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait()


def call(channel: grpc.Channel, method: str, payload: bytes = b"x", **kwargs: object) -> object:
    """Calls an echo method whatever its shape; streams send and collect three messages."""
    request_streaming, response_streaming = SHAPES[method]
    name = path(method)
    if request_streaming and response_streaming:
        return list(channel.stream_stream(name)(iter([payload] * 3), **kwargs))
    if request_streaming:
        return channel.stream_unary(name)(iter([payload] * 3), **kwargs)
    if response_streaming:
        return list(channel.unary_stream(name)(payload, **kwargs))
    return channel.unary_unary(name)(payload, **kwargs)


def health_check(channel: grpc.Channel, timeout: float = 5.0) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=timeout
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass(frozen=True)
class Pki:
    """Two independent CAs' worth of certificates: `main` (trusted) and `other` (a stranger's)."""

    main: Path
    other: Path

    def tls(self, name: str, ca: Path | None = None, **kwargs: str | bool) -> TlsConfig:
        """NAME's certificate and key from the main CA, trusting `ca` (default: main's CA)."""
        return TlsConfig(
            tls_cert=str(self.main / f"{name}.pem"),
            tls_key=str(self.main / f"{name}.key"),
            tls_ca=str(ca or self.main / "ca.pem"),
            **kwargs,  # type: ignore[arg-type]
        )

    def stranger(self, name: str = "trainer") -> TlsConfig:
        """A client whose certificate another CA signed (it trusts the main CA)."""
        return TlsConfig(
            tls_cert=str(self.other / f"{name}.pem"),
            tls_key=str(self.other / f"{name}.key"),
            tls_ca=str(self.main / "ca.pem"),
        )


def make_pki(root: Path) -> Pki:
    hosts = ["localhost", "127.0.0.1"]
    make_certs(root / "main", ["policy", "trainer"], ["admin"], hosts)
    make_certs(root / "other", ["policy", "trainer"], [], hosts)
    return Pki(main=root / "main", other=root / "other")
