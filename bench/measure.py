"""What the benchmarks share: the two sides' rounds in ABBA order, their ratio, stopping the
server process a benchmark measures, and a process's peak memory (host; GPU by nvidia-smi).

On a shared machine other work comes and goes; alternating the sides round by round lets it
slow both alike, and the median of the per-round ratios (round i of one side ran right beside
round i of the other, under the same load) is steadier than best-of or mean on either side.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
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


GPU_QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
"""Each process's GPU memory now, as the driver accounts it (its CUDA context included)."""


def gpu_memory_mib() -> dict[int, float]:
    """One sample of GPU_QUERY: MiB per process id (summed over GPUs). FileNotFoundError
    without nvidia-smi; RuntimeError when it fails or prints what it should not."""
    done = subprocess.run(GPU_QUERY, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nvidia-smi exited {done.returncode}: {done.stderr.strip()[:200]}")
    used: dict[int, float] = {}
    for line in done.stdout.splitlines():
        if not line.strip():
            continue
        pid, _, mib = line.partition(",")
        try:
            used[int(pid)] = used.get(int(pid), 0.0) + float(mib)
        except ValueError:
            raise RuntimeError(f"nvidia-smi printed {line[:80]!r}, not 'pid, MiB'") from None
    return used


class GpuMemoryPeaks:
    """Samples gpu_memory_mib() every `interval` seconds in a thread while entered; `peak_mib`
    holds each process id's highest sample. A peak shorter than the interval can be missed:
    a lower bound, the same for every side. Inside a container that does not share the
    host's process ids, nvidia-smi lists no process: `peaks_of` then says which are missing."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_mib: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gpu-memory", daemon=True)
        self.error: str | None = None

    def __enter__(self) -> GpuMemoryPeaks:
        gpu_memory_mib()  # fails here, before the bench starts, if nvidia-smi cannot answer
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                for pid, mib in gpu_memory_mib().items():
                    self.peak_mib[pid] = max(mib, self.peak_mib.get(pid, 0.0))
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
                self.error = str(error)  # reported with the peaks; sampling stops
                return
            self._stop.wait(self.interval)

    def peaks_of(self, pids: dict[str, int]) -> tuple[dict[str, float], list[str]]:
        """The peaks of named processes, and the names nvidia-smi never listed (a process on
        the CPU, or ids it cannot see)."""
        found = {name: self.peak_mib[pid] for name, pid in pids.items() if pid in self.peak_mib}
        return found, [name for name in pids if name not in found]
