"""Checks config dataclasses share; each returns the problems found (texts naming the field)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from rlhf.defaults import DEVICE_HELP, DTYPE_NAMES
from rlhf.logs import quote

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def device_problems(name: str, value: str) -> list[str]:
    """A device string's form (cpu, cuda, cuda:N); whether this machine has it is checked where
    the model is placed."""
    if _DEVICE.fullmatch(value):
        return []
    return [f"{name}: unknown device {quote(value)}; use {DEVICE_HELP}"]


def dtype_problems(name: str, value: str) -> list[str]:
    if value in DTYPE_NAMES:
        return []
    return [f"{name}: unknown dtype {quote(value)}; choose one of {', '.join(DTYPE_NAMES)}"]


def choice_problems(name: str, value: Any, choices: Iterable[Any]) -> list[str]:
    choices = tuple(choices)
    if value in choices:
        return []
    return [f"{name} must be one of {', '.join(map(str, choices))}; got {quote(value)}"]


def at_least(obj: object, minimum: float, *names: str) -> list[str]:
    """`name must be >= minimum` for each named field below it."""
    return [
        f"{name} must be >= {minimum}, got {quote(getattr(obj, name))}"
        for name in names
        if getattr(obj, name) < minimum
    ]


def at_most(obj: object, maximum: float, *names: str) -> list[str]:
    """`name must be <= maximum` for each named field above it."""
    return [
        f"{name} must be <= {maximum}, got {quote(getattr(obj, name))}"
        for name in names
        if getattr(obj, name) > maximum
    ]
