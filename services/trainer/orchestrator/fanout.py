"""What the policy pool and replicated reward sources share: a replica's HOST:PORT, a DNS name's
addresses, a batch cut into even contiguous shards, and one call per replica at once."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from rlhf.logs import quote

T = TypeVar("T")
R = TypeVar("R")

MAX_ADDRESS_CHARS = 255
"""Longest HOST:PORT of one replica."""
_HOST_REFUSED = re.compile(r"[\s/,=+@]")
"""Characters no host holds and a spec uses between its parts."""


def split_host_port(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [V6]:PORT (the brackets dropped): a host without whitespace
    or any of /,=+@, an IPv6 host in brackets, a port from 0 to 65535, 255 characters at most.
    ValueError naming `address` otherwise."""
    host, _, port = address.rpartition(":")
    bare_v6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    bad_host = not host or bare_v6 or _HOST_REFUSED.search(host) is not None
    if bad_host or len(address) > MAX_ADDRESS_CHARS:
        raise ValueError(f"{quote(address)} is not HOST:PORT")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"port {quote(port)} of {quote(address)} is not a number from 0 to 65535")
    return host.removeprefix("[").removesuffix("]"), int(port)


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


def resolve(target: str) -> list[str]:
    """Every address HOST of HOST:PORT resolves to now, as HOST:PORT ([V6]:PORT), in the
    resolver's order, without repeats. Raises OSError when it does not resolve."""
    host, port = split_host_port(target)
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(sockaddr[0])
        address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if address not in found:
            found.append(address)
    return found
