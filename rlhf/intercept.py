"""Server interceptors that wrap the handler a method resolved to (auth, the stream cap).

gRPC hands an interceptor a `continuation` and leaves it to rebuild a handler of the same shape
(unary or streaming requests and responses) with the same codec; `HandlerInterceptor` and
`rewrap` do that once, so an interceptor only says how it wraps a behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
"""A handler's behaviour: (request or request iterator, context) -> response or iterator."""

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class HandlerInterceptor(grpc.ServerInterceptor):
    """An interceptor that only replaces the handler of a method the server has."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrap(handler, handler_call_details.method)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler to run for `method` (full name) instead of `handler`, or `handler`."""
        raise NotImplementedError


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Behaviour], Behaviour],
    streaming: Callable[[Behaviour], Behaviour],
) -> grpc.RpcMethodHandler:
    """The same handler (shape, codec) running `unary(behaviour)` when it answers with one
    message, `streaming(behaviour)` (a generator) when it answers with a stream."""
    behaviour = (
        handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    )
    wrap = streaming if handler.response_streaming else unary
    factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        wrap(behaviour),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
