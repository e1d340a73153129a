"""A rule reward for length: closeness to a target number of words or characters.

Explicit, for tests and for shaping experiments; it is never a silent fallback for a model that
did not load (the seed's `len(text) / 100` dummy was exactly that, and is gone).
"""

from __future__ import annotations

from services.reward.backends.base import RewardBackend

UNITS = ("words", "chars")


def text_length(text: str, unit: str) -> int:
    """Words are whitespace-separated runs (str.split()); chars are Python characters."""
    return len(text.split()) if unit == "words" else len(text)


class LengthBackend(RewardBackend):
    """score = -|length - target| / target: 0 at the target, -1 for an empty text.

    The score is <= 0 and falls linearly on both sides of the target; a text twice the target
    length also scores -1, longer ones below that (unbounded, limited in practice by
    --max-text-chars).
    """

    name = "length"

    def __init__(self, target: int, unit: str = "words") -> None:
        if target <= 0:
            raise ValueError(f"--target-length must be a positive number of {unit}, got {target}")
        if unit not in UNITS:
            raise ValueError(f"--length-unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.target = target
        self.unit = unit
        self.description = (
            f"-|len - {target}| / {target}, len in {unit}: 0 at exactly {target} {unit}, "
            "-1 for an empty text or twice the target, <= 0 always"
        )

    def score(self, texts: list[str]) -> list[float]:
        target = self.target
        return [-abs(text_length(text, self.unit) - target) / target for text in texts]
