"""What the benchmarks share: the two sides' rounds in ABBA order, their ratio, stopping the
server process a benchmark measures, and a process's peak memory.

On a shared machine other work comes and goes; alternating the sides round by round lets it
slow both alike, and the median of the per-round ratios (round i of one side ran right beside
round i of the other, under the same load) is steadier than best-of or mean on either side.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each side per round (each callable runs one round and returns its seconds),
    in ABBA order: A B, B A, A B, ..."""
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    names = list(sides)
    for round_ in range(rounds):
        for side in names if round_ % 2 == 0 else names[::-1]:
            seconds[side].append(sides[side]())
    return seconds


def speed_ratio(seconds: list[float], baseline_seconds: list[float]) -> float:
    """Speed relative to the baseline's (> 1: faster) for the same work per round: the median
    over rounds of baseline_seconds[i] / seconds[i]."""
    return statistics.median(b / a for a, b in zip(seconds, baseline_seconds))


def stop(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within 30 s."""
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def speed_ratios(seconds: list[float], baseline_seconds: list[float]) -> list[float]:
    """Each round's speed relative to the baseline's round beside it (speed_ratio's terms)."""
    return [b / a for a, b in zip(seconds, baseline_seconds, strict=True)]


def peak_memory_mib(pid: int) -> float:
    """A live process's peak resident memory (VmHWM in /proc/<pid>/status), in MiB."""
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"{status}: no VmHWM line (not a Linux process with memory?)")
