"""A run as the trainer's control API reports it, and the RunStatus/StepMetrics messages made
from it: the state the loop's thread updates, and the WatchRun stream that follows it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from rlhf.v1 import trainer_pb2
from services.trainer.orchestrator.loop import StepResult, TrainingLoop
from services.trainer.orchestrator.progress import Progress
from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer

State = trainer_pb2.RunState


class Run:
    """A run's state as the API reports it, updated by the loop's thread.

    Every change (state, a finished step, a new phase) is made under `changed` and wakes the
    WatchRun streams waiting on it.
    """

    def __init__(self, run_id: str, total_steps: int) -> None:
        self.run_id = run_id
        self.total_steps = total_steps
        self.state = State.RUN_STATE_STARTING
        self.error = ""
        self.history: list[tuple[StepResult, float]] = []
        """This session's finished steps, each with the Unix time it finished."""
        self.loop: TrainingLoop | None = None
        self.rewards: RewardMixer | None = None  # in force once the first endpoints are probed
        self.stop = threading.Event()
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None
        # Before the loop exists (it loads the models in its constructor) the run is loading.
        self._loading = Progress(phase="loading", since=time.time())

    def set_state(self, state: int, error: str = "") -> None:
        with self.changed:
            self.state = state
            self.error = error
            self.changed.notify_all()

    def attach(self, loop: TrainingLoop) -> None:
        """Follows the loop's progress; RUNNING unless a stop came while it loaded."""
        loop.progress.listeners.append(self._progressed)
        with self.changed:
            self.loop = loop
            if self.state == State.RUN_STATE_STARTING:
                self.state = State.RUN_STATE_RUNNING
            self.changed.notify_all()

    def request_stop(self) -> None:
        with self.changed:
            if self.active:
                self.state = State.RUN_STATE_STOPPING
                self.stop.set()
                self.changed.notify_all()

    def _progressed(self, _progress: Progress) -> None:
        with self.changed:
            self.changed.notify_all()

    def add_step(self, result: StepResult) -> None:
        with self.changed:
            self.history.append((result, time.time()))
            self.changed.notify_all()

    @property
    def active(self) -> bool:
        return self.state in (
            State.RUN_STATE_STARTING,
            State.RUN_STATE_RUNNING,
            State.RUN_STATE_STOPPING,
        )

    @property
    def progress(self) -> Progress:
        loop = self.loop
        return loop.progress.current if loop is not None else self._loading

    def status(self) -> trainer_pb2.RunStatus:
        loop = self.loop
        status = trainer_pb2.RunStatus(
            run_id=self.run_id,
            state=self.state,
            step=loop.step if loop else 0,
            total_steps=self.total_steps,
            weight_version=loop.weight_version if loop else 0,
            error=self.error,
            progress=progress_to_proto(self.progress),
        )
        if self.rewards is not None:
            status.rewards.extend(endpoint_to_proto(s.spec) for s in self.rewards.sources)
        if loop is not None:
            status.checkpoint_dir = str(loop.checkpoints) if loop.checkpoints.exists() else ""
            status.last_metrics.update(loop.last_stats)
        return status


def progress_to_proto(progress: Progress) -> trainer_pb2.RunProgress:
    now = time.time()
    return trainer_pb2.RunProgress(
        phase=trainer_pb2.RunPhase.Value(f"RUN_PHASE_{progress.phase.upper()}"),
        step=progress.step,
        phase_started=progress.since,
        phase_elapsed_s=max(0.0, now - progress.since),
        retries=progress.retries,
        last_error=progress.last_error,
    )


def endpoint_to_proto(spec: EndpointSpec) -> trainer_pb2.RewardEndpoint:
    return trainer_pb2.RewardEndpoint(address=spec.address, weight=spec.weight, name=spec.name)


def watch(run: Run, from_step: int, gone: threading.Event) -> Iterator[trainer_pb2.StepMetrics]:
    """WatchRun's messages: steps from from_step on, then live steps and phase changes, then
    END. Waits on the run's condition, which every change of the run and the call's end wake."""
    with run.changed:  # a resumed run's history starts at the step it resumed from
        history = run.history
        next_index = sum(1 for r, _ in history if r.step < from_step) if from_step else len(history)
    shown: tuple[Progress, int] | None = None
    while True:
        with run.changed:
            while not (
                gone.is_set()
                or next_index < len(run.history)
                or not run.active
                or (run.progress, run.state) != shown
            ):
                run.changed.wait()
            if gone.is_set():
                return
            pending = run.history[next_index:]
            progress, state, error = run.progress, run.state, run.error
        for result, finished in pending:
            yield trainer_pb2.StepMetrics(
                run_id=run.run_id,
                step=result.step,
                weight_version=result.weight_version,
                metrics=result.stats,
                timestamp=finished,
                state=state,
                event=trainer_pb2.WATCH_EVENT_STEP,
            )
        next_index += len(pending)
        if state in (State.RUN_STATE_COMPLETED, State.RUN_STATE_STOPPED, State.RUN_STATE_FAILED):
            yield _progress_message(run, trainer_pb2.WATCH_EVENT_END, progress, state, error)
            return
        if (progress, state) != shown:
            shown = (progress, state)
            yield _progress_message(run, trainer_pb2.WATCH_EVENT_PROGRESS, progress, state)


def _finished(run: Run) -> int:
    return run.loop.step if run.loop is not None else 0


def _progress_message(
    run: Run, event: int, progress: Progress, state: int, error: str = ""
) -> trainer_pb2.StepMetrics:
    loop = run.loop
    return trainer_pb2.StepMetrics(
        run_id=run.run_id,
        step=progress.step if event == trainer_pb2.WATCH_EVENT_PROGRESS else _finished(run),
        weight_version=loop.weight_version if loop is not None else 0,
        timestamp=time.time(),
        state=state,
        event=event,
        progress=progress_to_proto(progress),
        error=error,
    )
