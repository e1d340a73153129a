"""One way for servicers to reject a request: raise `RpcError(code, message)`.

`handle_errors` turns it into the right gRPC status, and any other exception into INTERNAL
with the traceback in the log, so a service stays up after any request.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger("rlhf.errors")

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
                extra={"rpc": method.__name__, "code": err.code.name, "reason": err.message},
            )
            context.abort(err.code, err.message)
        except grpc.RpcError as err:  # a call this service made to another one failed
            code = err.code() if callable(getattr(err, "code", None)) else None
            detail = err.details() if callable(getattr(err, "details", None)) else str(err)
            log.warning("upstream call failed", extra={"rpc": method.__name__, "reason": detail})
            context.abort(code or grpc.StatusCode.UNAVAILABLE, f"upstream call failed: {detail}")
        except Exception as err:  # noqa: BLE001 - the service must survive any request
            log.exception("request failed", extra={"rpc": method.__name__})
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")

    return wrapper  # type: ignore[return-value]
