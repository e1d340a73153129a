"""Where a run is right now: the phase of the step in progress, since when, its retries and
the last error retried.

The loop writes it, the control API reads it (GetRun, WatchRun, `rlhf status`/`watch`), so a
slow first step or a stalled peer is visible while it happens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

PHASES = ("loading", "generating", "scoring", "updating", "syncing", "checkpointing", "idle")
"""Phases in the order a step goes through them; "loading" is before the first step."""
LAST_ERROR_CHARS = 300
"""How much of a retried error Progress.last_error keeps: the transport's message (call, peer,
status, the peer's words) fits; a peer's long text does not fill every GetRun."""


@dataclass(frozen=True)
class Progress:
    phase: str = "loading"
    step: int = 0
    """The step this phase belongs to (the one in progress; 0 while loading)."""
    since: float = 0.0
    """Unix time the phase started."""
    retries: int = 0
    """Failed attempts of this phase so far (transient errors retried)."""
    last_error: str = ""
    """The last transient error retried in this phase, cut to LAST_ERROR_CHARS; "" if none.
    The transports' own words (call, peer, status, message), never a raw gRPC exception."""


class ProgressTracker:
    """Thread-safe holder of the current Progress; `listeners` are called on every change."""

    def __init__(self, start: Progress | None = None) -> None:
        """`start`: the progress before the first change (default: loading, from now)."""
        self._lock = threading.Lock()
        self._now = start or Progress(since=time.time())
        self.listeners: list = []

    def enter(self, phase: str, step: int) -> None:
        assert phase in PHASES, phase
        self._set(Progress(phase=phase, step=step, since=time.time()))

    def retried(self, error: str) -> None:
        """One more failed attempt of the phase in progress, which failed with `error`."""
        if len(error) > LAST_ERROR_CHARS:
            error = f"{error[: LAST_ERROR_CHARS - 3]}..."
        with self._lock:
            now = self._now
        self._set(replace(now, retries=now.retries + 1, last_error=error))

    @property
    def current(self) -> Progress:
        with self._lock:
            return self._now

    def _set(self, progress: Progress) -> None:
        with self._lock:
            self._now = progress
        for listener in list(self.listeners):
            listener(progress)
