"""Waiting on a call while watching its peer: a hung peer is given up on in seconds.

A SIGSTOPped or wedged process keeps its TCP connections open, so a call to it fails only at
its deadline (minutes). `wait_watched` waits on the call (a future) in slices of
CallLimits.health_interval_s and, between slices, asks the peer's grpc.health.v1 service on the
same channel. After CallLimits.health_failures failed checks in a row the call is cancelled and
PeerStopped raised: an RpcError that reads UNAVAILABLE, so whoever sorts failures (the
trainer's transports) treats it like a peer that cannot be reached. A peer that answers its
health checks is waited on until the call's own deadline, however slow the call.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from rlhf.call_limits import CallLimits
from rlhf.channels import check_health


class PeerStopped(grpc.RpcError):
    """A call given up because its peer stopped answering health checks (status UNAVAILABLE)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message

    def __str__(self) -> str:
        return self._message


def wait_watched(call: Any, channel: grpc.Channel, service: str, limits: CallLimits) -> Any:
    """The response of `call` (a grpc.Future of a call on `channel`), whose peer serves
    `service`. Raises the call's own RpcError when it fails, PeerStopped when the peer stopped
    answering its health checks (the call is then cancelled)."""
    began = time.monotonic()
    failed = 0
    while True:
        try:
            return call.result(timeout=limits.health_interval_s)
        except grpc.FutureTimeoutError:
            pass  # still waiting: is the peer alive?
        problem = _health_problem(channel, service, limits.health_timeout_s)
        failed = failed + 1 if problem else 0
        if failed >= limits.health_failures and call.cancel():
            raise PeerStopped(
                f"the service stopped answering its health checks ({failed} in a row: "
                f"{problem}); the call was given up after {time.monotonic() - began:.1f} s"
            )
        # cancel() is False when the call has just ended: the next slice returns its outcome.


def _health_problem(channel: grpc.Channel, service: str, timeout_s: float) -> str:
    """Why one health check of `service` failed, in plain words; "" when the peer answered.

    Only no answer, UNAVAILABLE and NOT_SERVING count: any other answer (NOT_FOUND for a service
    name it does not know, UNIMPLEMENTED from a peer without health) proves the peer is alive."""
    try:
        status = check_health(channel, service, timeout_s)
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer within {timeout_s:g} s"
        if code == grpc.StatusCode.UNAVAILABLE:
            return "unreachable (UNAVAILABLE)"
        return ""
    return "NOT_SERVING" if status == "NOT_SERVING" else ""
