"""Where a run is right now: the phase of the step in progress, since when, and its retries.

The loop writes it, the control API reads it (GetRun, WatchRun, `rlhf status`/`watch`), so a
slow first step or a stalled peer is visible while it happens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

PHASES = ("loading", "generating", "scoring", "updating", "syncing", "checkpointing", "idle")
"""Phases in the order a step goes through them; "loading" is before the first step."""


@dataclass(frozen=True)
class Progress:
    phase: str = "loading"
    step: int = 0
    """The step this phase belongs to (the one in progress; 0 while loading)."""
    since: float = 0.0
    """Unix time the phase started."""
    retries: int = 0
    """Failed attempts of this phase so far (transient errors retried)."""


class ProgressTracker:
    """Thread-safe holder of the current Progress; `listeners` are called on every change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = Progress(since=time.time())
        self.listeners: list = []

    def enter(self, phase: str, step: int) -> None:
        assert phase in PHASES, phase
        self._set(Progress(phase=phase, step=step, since=time.time()))

    def retried(self) -> None:
        with self._lock:
            now = self._now
        self._set(replace(now, retries=now.retries + 1))

    @property
    def current(self) -> Progress:
        with self._lock:
            return self._now

    def _set(self, progress: Progress) -> None:
        with self._lock:
            self._now = progress
        for listener in list(self.listeners):
            listener(progress)
