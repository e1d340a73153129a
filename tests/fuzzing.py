"""A seeded generator of hostile requests for tests/test_fuzz.py, and the tally of answers.

`Fuzzer.message(cls)` fills any protobuf message from its descriptor with extreme values:
huge, negative, NaN and infinite numbers, long, unicode, NUL and path-like strings, empty and
oversized repeated and map fields, unknown enum values. `Fuzzer.raw()` makes bodies no
message class would write: random bytes, and valid bodies cut short, bit-flipped or extended.
`Tally` counts the status codes each service answered.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1e-45,
    5e-324,
    1e-7,
    0.5,
    1.0,
    1.5,
    -1.0,
    3.4e38,
    1e300,
    -1e300,
]
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
PIECES = [
    "a",
    "hello",
    "the movie was good",
    "é",
    "中文",
    "🙂",
    "\u202e",
    "\u0000",
    "\n",
    "\t",
    "\\",
    "'",
    '"',
    "${HOME}",
    "%s%n",
    "../../",
    "/etc/passwd",
    "{{7*7}}",
    ":",
    "=",
    "@",
    "&a [*a, *a]",
    "- ",
    "run: {steps: -5}",
    "ppo:\n  learning_rate: nan\n",
    "127.0.0.1:1",
    "\ufeff",
    "\U0010ffff",
]


class Fuzzer:
    """Seeded: the same seed gives the same requests."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def string(self) -> str:
        rng = self.rng
        kind = rng.random()
        if kind < 0.15:
            return ""
        if kind < 0.8:
            return "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 8)))
        if kind < 0.97:
            return "".join(chr(rng.randrange(1, 0xD800)) for _ in range(rng.randrange(1, 64)))
        # Long: rare, or the storm is mostly copying bytes.
        size = rng.choice([1000, 1000, 10_000, 10_000, 100_000, 300_000, 1_000_000])
        return rng.choice(PIECES) * (size // 2 + 1)

    def integer(self, low: int, high: int) -> int:
        rng = self.rng
        edges = [low, high, 0, 1, 2, 3, min(high, 64), min(high, 1000), min(high, 2**31 - 1)]
        if low < 0:
            edges += [-1, low + 1]
        return rng.choice(edges) if rng.random() < 0.7 else rng.randint(low, high)

    def scalar(self, field: FieldDescriptor) -> Any:
        kind = field.type
        if kind in INT_RANGES:
            return self.integer(*INT_RANGES[kind])
        if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return self.rng.choice(FLOATS) if self.rng.random() < 0.8 else self.rng.uniform(-5, 5)
        if kind == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if kind == FieldDescriptor.TYPE_STRING:
            return self.string()
        if kind == FieldDescriptor.TYPE_BYTES:
            return self.rng.randbytes(self.rng.choice([0, 1, 7, 100, 5000]))
        if kind == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            return self.rng.choice([*known, -1, 99, 2**31 - 1])
        raise TypeError(f"no generator for field type {kind}")

    def count(self) -> int:
        """How many items a repeated field gets: mostly few, sometimes far too many."""
        rng = self.rng
        return rng.choice([0, 0, 1, 1, 2, 3, 5]) if rng.random() < 0.97 else rng.choice([65, 300])

    def message(self, cls: type[Message], depth: int = 0, fill: float = 0.6) -> Message:
        """A `cls` with each field set (or not) to something extreme."""
        message = cls()
        for field in message.DESCRIPTOR.fields:
            if self.rng.random() > fill:
                continue
            try:
                self._set(message, field, depth)
            except (ValueError, TypeError, OverflowError):
                pass  # a value the field cannot hold (e.g. 1e300 in a float): leave it unset
        return message

    def _set(self, message: Message, field: FieldDescriptor, depth: int) -> None:
        target = getattr(message, field.name)
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and field.message_type.GetOptions().map_entry:
            for _ in range(self.count()):
                target[self.string()] = self.string()
        elif field.is_repeated:
            for _ in range(self.count()):
                if is_message:
                    if depth < 3:
                        item = target.add()
                        item.CopyFrom(self.message(type(item), depth + 1))
                else:
                    target.append(self.scalar(field))
        elif is_message:
            if depth < 3:
                target.CopyFrom(self.message(type(target), depth + 1))
        else:
            setattr(message, field.name, self.scalar(field))

    def raw(self, valid: bytes = b"") -> bytes:
        """Random bytes, or `valid` truncated, bit-flipped or with garbage appended."""
        rng = self.rng
        if valid and rng.random() < 0.5:
            data = bytearray(valid)
            action = rng.randrange(3)
            if action == 0:
                return bytes(data[: rng.randrange(len(data) + 1)])
            if action == 1:
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                return bytes(data)
            return bytes(data) + rng.randbytes(rng.randrange(1, 20))
        return rng.randbytes(rng.choice([0, 1, 2, 3, 5, 8, 16, 64, 1000, 10_000]))


class Tally:
    """The status codes one service answered, by method."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.codes: Counter[str] = Counter()
        self.bad: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    def call(self, method: str, send: Callable[[], Any]) -> grpc.StatusCode:
        """Runs one request; counts its code; remembers INTERNAL and UNKNOWN answers."""
        try:
            send()
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                self.bad.append(f"{method}: {code.name}: {(err.details() or '')[:300]}")
        self.codes[code.name] += 1
        return code

    def report(self) -> str:
        counts = ", ".join(f"{code} {n}" for code, n in self.codes.most_common())
        return f"fuzz {self.service}: {self.total} requests: {counts}"
