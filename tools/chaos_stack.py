"""The chaos test's processes and eyes: policy, reward (VADER) and trainer services as separate
OS processes that can be killed, frozen and restarted on their own ports, and a follower of a
run's phases through the trainer's WatchRun.

Each service keeps the loopback port it was first given (free_port, once), so a restarted
service is found where its peers already point; every start writes its own log
(<logs>/<kind>.log, then <kind>.1.log, ...), so a killed process's last words are kept. All
processes serve the launcher's mutual TLS (tools/launch.py: LocalPki, start_service).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rlhf.v1 import trainer_pb2
from services.trainer.api.client import TrainerClient, TrainerError
from services.trainer.orchestrator.progress import PHASES
from tools.launch import SERVICE_KINDS, LocalPki, ServiceProcess, free_port, start_service

TERMINAL = ("COMPLETED", "STOPPED", "FAILED")
"""Run states (RunState names without their prefix) after which a run does nothing more."""
CHILD_ENV = {"OMP_NUM_THREADS": "1"}
"""Every service on one thread: the same float reductions in every process and restart, and no
spinning OpenMP sibling on a shared 2-core machine."""
READY_TIMEOUT_S = 120.0
"""Longest a (re)start may take to serve health SERVING (the tiny policy takes ~6 s here)."""


class ChaosStack:
    """Policy, reward and trainer processes of one chaos session, each on a fixed port."""

    def __init__(self, model: Path, folder: Path) -> None:
        self.model = model
        self.logs = folder / "logs"
        self.output_dir = folder / "runs"
        self.pki = LocalPki.make(folder / "certs")
        self.ports = {kind: free_port() for kind in SERVICE_KINDS}
        self.processes: dict[str, ServiceProcess] = {}
        self._starts: Counter[str] = Counter()

    def address(self, kind: str) -> str:
        return f"127.0.0.1:{self.ports[kind]}"

    def _args(self, kind: str) -> list[str]:
        if kind == "policy":
            return ["policy", "serve", "--model", str(self.model)]
        if kind == "reward":
            return ["reward", "serve", "--backend", "vader", "--name", "vader"]
        return [
            *("trainer", "serve", "--policy", self.address("policy")),
            *("--reward", self.address("reward"), "--output-dir", str(self.output_dir)),
            *("--model-root", str(self.model)),
        ]

    def start(self, kind: str) -> float:
        """Starts KIND on its port and waits until it serves; returns the seconds it took."""
        count = self._starts[kind]
        self._starts[kind] += 1
        name = kind if count == 0 else f"{kind}.{count}"
        began = time.monotonic()
        self.processes[kind] = start_service(
            name,
            self._args(kind),
            self.logs,
            port=self.ports[kind],
            env=CHILD_ENV,
            ready_timeout_s=READY_TIMEOUT_S,
            pki=self.pki,
        )
        return time.monotonic() - began

    def kill(self, kind: str) -> None:
        """SIGKILL, as an OOM kill or a lost node would: no drain, no goodbye."""
        process = self.processes[kind].process
        process.kill()
        process.wait()

    def freeze(self, kind: str, seconds: float) -> None:
        """SIGSTOP for `seconds`, then SIGCONT: a hung peer that comes back."""
        pid = self.processes[kind].process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    def trainer_client(self) -> TrainerClient:
        """A client of the trainer's API as `admin` (a new channel: one per trainer process)."""
        return TrainerClient(self.address("trainer"), client=self.pki.client())

    def close(self) -> None:
        """Stops every process (a frozen one is woken first, or it could not drain)."""
        for service in self.processes.values():
            if service.process.poll() is None:
                os.kill(service.process.pid, signal.SIGCONT)
            service.stop(timeout_s=10)


def phase_name(phase: int) -> str:
    """A RunPhase as the loop names it ("generating", ...)."""
    return trainer_pb2.RunPhase.Name(phase).removeprefix("RUN_PHASE_").lower()


def state_name(state: int) -> str:
    return trainer_pb2.RunState.Name(state).removeprefix("RUN_STATE_")


@dataclass(frozen=True)
class Seen:
    """What the follower last saw of the run."""

    step: int
    """The step the phase belongs to (the one in progress; the one just finished when idle)."""
    phase: str
    finished: int
    """The last step finished."""
    state: str
    error: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def reached(self, step: int, phase: str) -> bool:
        """Whether the run is at or past `phase` of `step` (a resumed run may be behind)."""
        return (self.step, PHASES.index(self.phase)) >= (step, PHASES.index(phase))


class RunFollower:
    """Follows one run on one trainer process through WatchRun, in a thread; a trainer that
    dies (or a closed client) ends the stream, and a restarted trainer needs a new follower."""

    def __init__(self, client: TrainerClient, run_id: str) -> None:
        status = client.get(run_id)
        progress = status.progress
        self._seen = Seen(
            progress.step, phase_name(progress.phase), status.step, state_name(status.state)
        )
        self._changed = threading.Condition()
        self._gone = False
        self._thread = threading.Thread(
            target=self._follow, args=(client, run_id), name=f"follow-{run_id}", daemon=True
        )
        self._thread.start()

    @property
    def seen(self) -> Seen:
        with self._changed:
            return self._seen

    def wait_for(self, predicate: Callable[[Seen], bool], timeout_s: float) -> Seen | None:
        """The first Seen that satisfies `predicate`; None on timeout or when the stream ends
        first."""
        with self._changed:
            self._changed.wait_for(lambda: predicate(self._seen) or self._gone, timeout_s)
            return self._seen if predicate(self._seen) else None

    def _follow(self, client: TrainerClient, run_id: str) -> None:
        try:
            for message in client.watch(run_id, from_step=0):
                self._update(message)
        except TrainerError:
            pass  # the trainer was killed, or the client closed: the stream is over either way
        finally:
            with self._changed:
                self._gone = True
                self._changed.notify_all()

    def _update(self, message: trainer_pb2.StepMetrics) -> None:
        with self._changed:
            seen = self._seen
            if message.event == trainer_pb2.WATCH_EVENT_STEP:
                seen = replace(seen, finished=max(seen.finished, message.step))
            else:
                progress = message.progress
                seen = replace(
                    seen,
                    step=progress.step,
                    phase=phase_name(progress.phase),
                    state=state_name(message.state),
                    error=message.error,
                )
                if message.event == trainer_pb2.WATCH_EVENT_END:
                    seen = replace(seen, finished=message.step)
            self._seen = seen
            self._changed.notify_all()
