"""The progress bar of a run: steps done, the last step's reward and KL, and the phase of the
step in progress with its elapsed time and retries, ticking every second on a terminal so a
slow step is visibly alive; each retry's error is printed above the bar once, so a stalled peer
is named while the run waits on it.

`rlhf train`, `rlhf watch` and `make run` show it; it is fed neutral values (phase names,
seconds), so the loop in this process and a trainer's WatchRun stream drive it alike.
"""

from __future__ import annotations

import sys
import threading
import time

TICK_S = 1.0
"""How often the elapsed time of the phase in progress is redrawn."""


class ProgressDisplay:
    def __init__(self, total: int, initial: int = 0) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._phase = ""  # "" until the first phase is known
        self._detail = ""
        self._phase_began = time.monotonic()  # this machine's clock: no skew with the trainer
        self._retry_shown: tuple[int, str, int] = (0, "", 0)  # (step, phase, retries) printed
        self._ticker = threading.Thread(target=self._tick, name="progress-tick", daemon=True)
        # On a terminal the elapsed time ticks; in a log file each change is one line enough.
        if sys.stderr.isatty():
            self._ticker.start()

    def phase(
        self,
        phase: str,
        step: int,
        elapsed_s: float,
        retries: int = 0,
        note: str = "",
        last_error: str = "",
    ) -> None:
        """The run entered `phase` of `step` (`elapsed_s` ago); retries of it so far; `note`
        e.g. "stopping"; `last_error` the error of the last retry ("" if none)."""
        with self._lock:
            if last_error and (step, phase, retries) != self._retry_shown:
                where = f"step {step} {phase}" if step else phase
                self.bar.write(f"{where}: retry {retries}: {last_error}", file=sys.stderr)
                self._retry_shown = (step, phase, retries)
            self._phase = f"step {step} {phase}" if step else phase
            extras = [f"retry {retries}"] if retries else []
            self._detail = ", ".join(extras + ([note] if note else []))
            self._phase_began = time.monotonic() - elapsed_s
            self._draw()

    def say(self, text: str) -> None:
        """A line above the bar, on stderr (e.g. the trainer went away; reconnecting)."""
        with self._lock:
            self.bar.write(text, file=sys.stderr)

    def step(self, step: int, stats: dict[str, float]) -> None:
        """Step `step` finished with these statistics."""
        with self._lock:
            self.bar.n = step
            self.bar.set_postfix(
                reward=f"{stats.get('env/reward_mean', float('nan')):+.3f}",
                kl=f"{stats.get('objective/kl', float('nan')):.3f}",
                version=int(stats.get("weight_version", 0)),
                refresh=False,
            )
            self._draw()

    def close(self) -> None:
        self._closed.set()
        if self._ticker.is_alive():
            self._ticker.join()
        with self._lock:
            self.bar.close()

    def _draw(self) -> None:
        if self._phase:
            elapsed = time.monotonic() - self._phase_began
            detail = f" ({self._detail})" if self._detail else ""
            self.bar.set_description_str(f"{self._phase} {elapsed:.0f}s{detail}", refresh=False)
        self.bar.refresh()

    def _tick(self) -> None:
        while not self._closed.wait(TICK_S):
            with self._lock:
                self._draw()
