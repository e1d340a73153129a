"""The services' method handlers, built from the proto service descriptors, decoding requests
themselves so that no request body can turn into INTERNAL.

gRPC's own deserializer path answers INTERNAL ("Exception deserializing request!") when a body
does not parse. Here every method gets `request_deserializer=None` (the raw bytes) and one
shared wrapper that first checks the body's size against the method's cap (before any parsing,
so a huge body costs no parse), then parses it with the method's message class:

- over the cap: the method's `too_large` code (RESOURCE_EXHAUSTED where the cap is a server
  setting, INVALID_ARGUMENT where the API's own field limits fix it), with both sizes;
- not a valid message (truncated, bad wire type, invalid UTF-8 in a string): INVALID_ARGUMENT.

Request streams are decoded message by message; a stream that sends nothing for `idle_s` is
ended with DEADLINE_EXCEEDED, and a method may cap its concurrent calls (RESOURCE_EXHAUSTED
beyond). Response streams get the same error mapping as `rlhf.errors.handle_errors`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from rlhf.errors import RpcError, clip, exhausted, invalid

log = logging.getLogger("rlhf.handlers")

KiB = 1024
MiB = 1024 * KiB
CONTROL_REQUEST_BYTES = 256 * KiB
"""The cap of a control request (ids, small configs): far above any legitimate one."""


@dataclass(frozen=True)
class MethodLimits:
    """What one method accepts per request message, and how many calls at once."""

    max_bytes: int = CONTROL_REQUEST_BYTES
    """Largest serialized request message, checked before parsing."""
    too_large: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED
    """The code for a larger one."""
    idle_s: float | None = None
    """Request streams: end the call (DEADLINE_EXCEEDED) when no message came for this long."""
    max_concurrent: int | None = None
    """Calls of this method at once (RESOURCE_EXHAUSTED beyond); None: no own cap."""


CONTROL = MethodLimits(too_large=grpc.StatusCode.INVALID_ARGUMENT)
"""A control or info method: no valid request comes near CONTROL_REQUEST_BYTES, so a larger one
is invalid whatever the server's state."""

Decoder = Callable[[bytes], Any]


class _Method:
    """One method's decoding and limits."""

    def __init__(
        self, descriptor: MethodDescriptor, limits: MethodLimits, decoder: Decoder | None
    ) -> None:
        self.name = descriptor.name
        self.limits = limits
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        self.decode_fn = decoder or request_class.FromString
        self.serialize = message_factory.GetMessageClass(descriptor.output_type).SerializeToString
        self.slots = (
            threading.BoundedSemaphore(limits.max_concurrent) if limits.max_concurrent else None
        )

    def decode(self, body: bytes, index: int | None = None) -> Any:
        """The parsed request, or RpcError (size first, then syntax)."""
        where = self.name if index is None else f"{self.name} message {index}"
        if len(body) > self.limits.max_bytes:
            raise RpcError(
                self.limits.too_large,
                f"{where} is {len(body)} bytes; this server accepts at most "
                f"{self.limits.max_bytes} bytes per {self.name} message",
            )
        try:
            return self.decode_fn(body)
        except (DecodeError, ValueError, RuntimeError) as err:
            # upb raises DecodeError; a too deeply nested body can also end in RuntimeError.
            raise invalid(f"{where} is not a valid request message: {type(err).__name__}") from None

    def acquire(self) -> None:
        if self.slots is not None and not self.slots.acquire(blocking=False):
            raise exhausted(
                f"{self.limits.max_concurrent} {self.name} calls are in progress, the most this "
                "server takes at once: retry when one has ended"
            )

    def release(self) -> None:
        if self.slots is not None:
            self.slots.release()


def _requests(method: _Method, raw: Iterator[bytes]) -> Iterator[Any]:
    """A request stream's messages decoded one by one; with `idle_s`, read on a helper thread so
    that a silent client ends the call instead of holding its thread forever."""
    idle = method.limits.idle_s
    if idle is None:
        for index, body in enumerate(raw):
            yield method.decode(body, index)
        return
    # Two messages of read-ahead at most: gRPC's flow control still holds back a sender that
    # is faster than the receiver, instead of the queue holding a whole upload.
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
    done = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not done.is_set():  # the call's thread may have stopped reading
            try:
                inbox.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for body in raw:
                if not put(("message", body)):
                    return
            put(("end", None))
        except Exception as err:  # noqa: BLE001 - handed to the call's thread, raised there
            put(("error", err))

    threading.Thread(target=pump, name=f"{method.name}-reader", daemon=True).start()
    try:
        yield from _drain(method, inbox, idle)
    finally:
        done.set()


def _drain(method: _Method, inbox: queue.Queue[tuple[str, Any]], idle: float) -> Iterator[Any]:
    """The reader thread's messages, decoded, until the stream ends or is silent for `idle`."""
    index = 0
    while True:
        try:
            kind, item = inbox.get(timeout=idle)
        except queue.Empty:
            raise RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no {method.name} message for {idle:g} s (the server's idle limit); "
                "the call was ended and nothing it sent was applied",
            ) from None
        if kind == "end":
            return
        if kind == "error":
            raise item
        yield method.decode(item, index)
        index += 1


def _abort(context: grpc.ServicerContext, method: _Method, err: RpcError) -> None:
    message = clip(err.message)
    log.warning(
        "request refused", extra={"rpc": method.name, "code": err.code.name, "reason": message}
    )
    context.abort(err.code, message)


def _handler(method: _Method, behavior: Callable[..., Any], descriptor: MethodDescriptor) -> Any:
    """The grpc method handler running `behavior` on decoded requests under the limits."""
    streaming_in, streaming_out = descriptor.client_streaming, descriptor.server_streaming

    def start(argument: Any, context: grpc.ServicerContext) -> Any:
        """The decoded request (or request stream), once a slot is held; aborts if refused."""
        try:
            request = _requests(method, argument) if streaming_in else method.decode(argument)
            method.acquire()
        except RpcError as err:
            _abort(context, method, err)
        return request

    def once(argument: Any, context: grpc.ServicerContext) -> Any:
        request = start(argument, context)
        try:
            return behavior(request, context)  # decorated with handle_errors
        finally:
            method.release()

    def stream(argument: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        # A generator has no decorator to map its errors: they are mapped here, as
        # handle_errors does. Servicers raise RpcError and never call context.abort().
        request = start(argument, context)
        try:
            yield from behavior(request, context)
            return
        except RpcError as err:
            failure = err
        except grpc.RpcError:
            raise
        except Exception as err:  # noqa: BLE001 - the service must survive any request
            log.exception("request failed", extra={"rpc": method.name})
            failure = RpcError(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            method.release()
        _abort(context, method, failure)

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(streaming_in, streaming_out)]
    return factory(
        stream if streaming_out else once,
        request_deserializer=None,
        response_serializer=method.serialize,
    )


def add_service(
    service: ServiceDescriptor,
    servicer: Any,
    server: grpc.Server,
    limits: Mapping[str, MethodLimits],
    decoders: Mapping[str, Decoder] | None = None,
) -> None:
    """Registers `servicer`'s methods for `service` with self-decoding handlers.

    `limits` must name every method of the service (a method without a considered cap is a
    mistake, not a default); `decoders` replaces a method's message class (e.g. the weight
    chunks' zero-copy parser, which must not raise: it reports a bad chunk in its result).
    """
    missing = set(service.methods_by_name) - set(limits)
    if missing:
        raise ValueError(f"{service.full_name}: no limits for {sorted(missing)}")
    handlers = {}
    for name, descriptor in service.methods_by_name.items():
        method = _Method(descriptor, limits[name], (decoders or {}).get(name))
        handlers[name] = _handler(method, getattr(servicer, name), descriptor)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
