"""One way for servicers to reject a request: raise `RpcError(code, message)`.

`handle_errors` turns it into the right gRPC status, and any other exception into INTERNAL
with the traceback in the log, so a service stays up after any request. INTERNAL is for the
service's own faults only: every client mistake must be caught as an RpcError before that
(tests/test_fuzz.py sends thousands of hostile requests and counts any INTERNAL as a bug).

Messages quote client text through `rlhf.logs.quote`; as a last guard, a status message is cut
to MAX_DETAIL_CHARS here (gRPC refuses a status whose details overflow its metadata limit, and
the client would see RESOURCE_EXHAUSTED about metadata instead of the real reason).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger("rlhf.errors")

MAX_DETAIL_CHARS = 1000
"""Longest status message sent or logged (far below gRPC's 8 KiB metadata limit)."""

F = TypeVar("F", bound=Callable[..., Any])


class RpcError(Exception):
    """A request the service refuses, with the status code and a message that says what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def precondition(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.FAILED_PRECONDITION, message)


def exhausted(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.UNAVAILABLE, message)


def clip(message: str) -> str:
    """`message` cut to MAX_DETAIL_CHARS (a status message and its log line)."""
    if len(message) <= MAX_DETAIL_CHARS:
        return message
    return f"{message[:MAX_DETAIL_CHARS]}... ({len(message)} characters)"


def check_caller(context: grpc.ServicerContext, work: str) -> None:
    """Raises RpcError (CANCELLED or DEADLINE_EXCEEDED) when the caller no longer waits for
    `work`: called where queued work starts, so a call given up on costs nothing more."""
    if context.time_remaining() <= 0:
        raise RpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the caller's deadline passed before {work}"
        )
    if not context.is_active():
        raise RpcError(grpc.StatusCode.CANCELLED, f"the caller went away before {work}")


def handle_errors(method: F) -> F:
    """Decorates a unary-response servicer method: RpcError -> its status; else INTERNAL.

    Servicer methods raise RpcError rather than call context.abort() themselves.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except RpcError as err:
            log.warning(
                "request refused",
                extra={"rpc": method.__name__, "code": err.code.name, "reason": clip(err.message)},
            )
            context.abort(err.code, clip(err.message))
        except grpc.RpcError as err:  # a call this service made to another one failed
            code = err.code() if callable(getattr(err, "code", None)) else None
            detail = err.details() if callable(getattr(err, "details", None)) else str(err)
            detail = clip(detail or "")
            log.warning("upstream call failed", extra={"rpc": method.__name__, "reason": detail})
            context.abort(code or grpc.StatusCode.UNAVAILABLE, f"upstream call failed: {detail}")
        except Exception as err:  # noqa: BLE001 - the service must survive any request
            log.exception("request failed", extra={"rpc": method.__name__})
            context.abort(grpc.StatusCode.INTERNAL, clip(f"{type(err).__name__}: {err}"))

    return wrapper  # type: ignore[return-value]
