"""What the policy pool and replicated reward sources share: a DNS name's addresses, a batch cut
into even contiguous shards, and one call per replica at once."""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def even_shards(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous shards of `count` items, sizes differing by at most
    one (the first ones take the extra); empty shards are left out."""
    size, extra = divmod(count, max(1, parts))
    bounds, start = [], 0
    for k in range(max(1, parts)):
        end = start + size + (1 if k < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def call_each(call: Callable[[T], R], items: list[T], name: str) -> list[R]:
    """call(item) for every item at once (threads named `name`); results in item order; the
    first exception in item order is raised."""
    if len(items) <= 1:
        return [call(item) for item in items]
    with ThreadPoolExecutor(len(items), thread_name_prefix=name) as pool:
        return list(pool.map(call, items))


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to now, as HOST:PORT ([V6]:PORT), in the resolver's order,
    without repeats. Raises OSError when it does not resolve."""
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(sockaddr[0])
        address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if address not in found:
            found.append(address)
    return found
