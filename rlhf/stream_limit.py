"""Long-lived streams get their own threads and a cap, so they can never take the threads that
unary calls and health checks need.

gRPC's sync server runs every call, streams included, on one thread pool: a WatchRun follower
or a stalled upload holds a thread for as long as it lasts. So a server's pool is `workers`
threads for unary calls plus `max_streams` for streams (`pool_size`), and `StreamLimit`, one
server interceptor, lets at most `max_streams` streaming calls (any method with a request or a
response stream: WatchRun, UpdateWeights, reflection, ...) run at once and answers the next
RESOURCE_EXHAUSTED at once. Streams then hold at most `max_streams` threads and `workers`
always remain for the rest. Health's Watch is left alone: it runs without holding a thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from rlhf.intercept import HandlerInterceptor, rewrap

log = logging.getLogger("rlhf.streams")


def pool_size(workers: int, max_streams: int) -> int:
    """Threads the server's pool needs: `workers` for unary calls, one per allowed stream."""
    return workers + max_streams


class StreamLimit(HandlerInterceptor):
    """At most `max_streams` streaming calls at once; RESOURCE_EXHAUSTED beyond."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if not (handler.request_streaming or handler.response_streaming):
            return handler
        if handler.response_streaming:
            behavior = handler.unary_stream or handler.stream_stream
            if getattr(behavior, "experimental_non_blocking", False):
                return handler  # health's Watch: answers by callback, holds no thread
        return rewrap(
            handler,
            lambda behavior: self._wrap_unary(behavior, method),
            lambda behavior: self._wrap_stream(behavior, method),
        )

    def _take(self, context: grpc.ServicerContext, method: str) -> None:
        """A slot for this stream, or the call refused (RESOURCE_EXHAUSTED) right away."""
        if not self._slots.acquire(blocking=False):
            log.warning("stream refused", extra={"rpc": method, "max_streams": self.max_streams})
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} streaming calls are open, the most this server takes at "
                "once (--max-streams): retry later",
            )

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            self._take(context, method)
            try:
                return behavior(request, context)
            finally:
                self._slots.release()

        return run

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._take(context, method)
            try:
                yield from behavior(request, context)
            finally:  # also when the client cancels: gRPC closes the generator
                self._slots.release()

        return run
