"""What every reward backend provides, so the servicer, the CLI and the benchmark treat all alike.

A backend turns texts into one float each. It knows nothing of gRPC, prompts or request limits:
the servicer builds the texts (response, or prompt + response), enforces the limits and checks
that what comes back is one finite score per text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class RewardBackend(ABC):
    """A source of scalar rewards. Subclasses set the class attributes and implement `score`."""

    name: str = ""
    """The backend kind as RewardInfo.backend reports it: "vader", "hf-classifier", ..."""
    model: str = ""
    """The model folder or hub name it loaded; empty for rule backends."""
    device: str = ""
    """The device it runs on, e.g. "cpu" or "cuda:1"; empty for rule backends."""
    description: str = ""
    """One line on what the score means and its range (RewardInfo.description)."""

    @abstractmethod
    def score(self, texts: list[str]) -> list[float]:
        """Scores each text; returns exactly len(texts) floats in the same order.

        The servicer calls it on its one ComputeThread (rlhf.compute), one call at a time: a
        backend needs no lock of its own.
        """
