"""A run as the trainer's control API reports it, and the RunStatus/StepMetrics messages made
from it: the state the loop's thread updates, the run.json it keeps on disk (records.py), and
the WatchRun stream that follows it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlhf.v1 import trainer_pb2
from services.trainer.api.records import Checkpointed, RunRecord, write_record
from services.trainer.orchestrator.checkpoint import latest_checkpoint
from services.trainer.orchestrator.loop import StepResult, TrainingLoop
from services.trainer.orchestrator.progress import Progress, ProgressTracker
from services.trainer.orchestrator.resume import Swap, journal_swap
from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer

State = trainer_pb2.RunState
log = logging.getLogger("rlhf.trainer.runs")
ENDED = (
    State.RUN_STATE_COMPLETED,
    State.RUN_STATE_STOPPED,
    State.RUN_STATE_FAILED,
    State.RUN_STATE_INTERRUPTED,
)
"""States in which a run's WatchRun streams end (INTERRUPTED: found so after a restart)."""


class Run:
    """A run's state as the API reports it, updated by the loop's thread.

    Every change (state, a finished step, a new phase) is made under `changed` and wakes the
    WatchRun streams waiting on it. With a `folder`, every change of state, swap and checkpoint
    is also recorded in its run.json. Until a loop exists (loading, or a run found on disk by a
    restarted trainer) the step, version and statistics are those of `saved`, its checkpoint.
    """

    def __init__(
        self,
        run_id: str,
        total_steps: int,
        saved: Checkpointed | None = None,
        folder: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        """`progress`: where the run is (default: loading, from now)."""
        self.run_id = run_id
        self.total_steps = total_steps
        self.state = State.RUN_STATE_STARTING
        self.error = ""
        self.saved = saved or Checkpointed()
        self.history: list[tuple[StepResult, float]] = list(self.saved.history)
        """The finished steps (from metrics.jsonl up to the checkpoint, then this session's),
        each with the Unix time it finished."""
        self.loop: TrainingLoop | None = None
        self.rewards: RewardMixer | None = None  # in force once the first endpoints are probed
        self.ended_rewards = [EndpointSpec.parse(r) for r in self.saved.rewards]
        """The endpoints GetRun lists while no mixer is in force (before it, and once ended)."""
        self.folder = folder
        self.policy = ""
        self.config: dict[str, Any] = {}
        self.swaps: list[Swap] = []
        self.updated = time.time()
        self.stop = threading.Event()
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None
        self._record_lock = threading.Lock()
        self.progress_tracker = ProgressTracker(
            progress or Progress(phase="loading", step=self.saved.step, since=time.time())
        )
        """The run's phase: loading until its TrainingLoop (which reports into it) takes over,
        so retries while the loop loads (reading the policy's facts) show in GetRun too."""
        self.progress_tracker.listeners.append(self._progressed)

    @classmethod
    def found(cls, record: RunRecord, saved: Checkpointed, folder: Path) -> Run:
        """A run a restarted trainer found on disk: one that was active is INTERRUPTED."""
        idle = Progress(phase="idle", step=saved.step, since=record.updated)
        run = cls(record.run_id, record.total_steps, saved, folder, idle)
        state = State.Value(record.state)
        run.state = State.RUN_STATE_INTERRUPTED if state not in ENDED else state
        run.error = record.error
        run.policy, run.config, run.swaps = record.policy, record.config, list(record.swaps)
        run.ended_rewards = [EndpointSpec.parse(r) for r in record.rewards]
        run.updated = record.updated
        return run

    # --- changes -----------------------------------------------------------------------------
    def set_state(self, state: int, error: str = "") -> None:
        with self.changed:
            self.state = state
            self.error = error
            self.changed.notify_all()
        self.save_record()

    def attach(self, loop: TrainingLoop) -> None:
        """The loop has loaded: RUNNING unless a stop came while it loaded; its checkpoints
        rewrite run.json."""
        loop.checkpointed.append(lambda _folder: self.save_record())
        with self.changed:
            self.loop = loop
            if self.state == State.RUN_STATE_STARTING:
                self.state = State.RUN_STATE_RUNNING
            self.changed.notify_all()
        self.save_record()

    def request_stop(self) -> None:
        with self.changed:
            if not self.active:
                return
            self.state = State.RUN_STATE_STOPPING
            self.stop.set()
            self.changed.notify_all()
        self.save_record()

    def record_swap(self, from_step: int, specs: list[EndpointSpec]) -> None:
        """Journals a swap (a resume re-applies it from `from_step` if it is after the
        checkpoint it resumes from)."""
        with self.changed:
            self.swaps = journal_swap(self.swaps, Swap(from_step, [str(s) for s in specs]))
        self.save_record()

    def release_loop(self) -> None:
        """The run ended: GetRun keeps its step, version, checkpoint and last statistics, and
        the loop goes, so a trainer that runs many runs holds no ended run's model, reference
        and optimizer state in memory."""
        with self.changed:
            loop, self.loop = self.loop, None
            if loop is None:
                return
            latest = latest_checkpoint(loop.checkpoints)
            self.saved = replace(
                self.saved,
                step=loop.step,
                weight_version=loop.weight_version,
                checkpoint_dir=str(latest) if latest is not None else self.saved.checkpoint_dir,
                last_metrics=dict(loop.last_stats) or self.saved.last_metrics,
            )

    def retire_rewards(self) -> None:
        """The run ends: GetRun keeps listing the endpoints in force, the mixer closes."""
        with self.changed:
            if self.rewards is not None:
                self.ended_rewards = [s.spec for s in self.rewards.sources]
            self.rewards = None

    def _progressed(self, _progress: Progress) -> None:
        with self.changed:
            self.changed.notify_all()

    def add_step(self, result: StepResult) -> None:
        with self.changed:
            self.history.append((result, time.time()))
            self.changed.notify_all()

    def save_record(self) -> None:
        """Writes run.json (runs without a folder keep none). A write that fails is logged:
        the run goes on, and a restarted trainer sees the previous record."""
        if self.folder is None:
            return
        with self._record_lock:
            with self.changed:
                self.updated = time.time()
                record = RunRecord(
                    run_id=self.run_id,
                    state=State.Name(self.state),
                    total_steps=self.total_steps,
                    policy=self.policy,
                    rewards=[str(s) for s in self.endpoints],
                    config=self.config,
                    error=self.error,
                    swaps=list(self.swaps),
                    updated=self.updated,
                )
            try:
                write_record(self.folder, record)
            except OSError as err:
                log.warning("run.json not written", extra={"run": self.run_id, "error": str(err)})

    # --- reading -----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state in (
            State.RUN_STATE_STARTING,
            State.RUN_STATE_RUNNING,
            State.RUN_STATE_STOPPING,
        )

    @property
    def endpoints(self) -> list[EndpointSpec]:
        mixer = self.rewards
        return [s.spec for s in mixer.sources] if mixer is not None else list(self.ended_rewards)

    @property
    def step(self) -> int:
        return self.loop.step if self.loop is not None else self.saved.step

    @property
    def weight_version(self) -> int:
        return self.loop.weight_version if self.loop is not None else self.saved.weight_version

    @property
    def progress(self) -> Progress:
        return self.progress_tracker.current

    def status(self) -> trainer_pb2.RunStatus:
        loop = self.loop
        status = trainer_pb2.RunStatus(
            run_id=self.run_id,
            state=self.state,
            step=self.step,
            total_steps=self.total_steps,
            weight_version=self.weight_version,
            error=self.error,
            progress=progress_to_proto(self.progress),
        )
        status.rewards.extend(endpoint_to_proto(s) for s in self.endpoints)
        if loop is not None and loop.checkpoints.exists():
            status.checkpoint_dir = str(loop.checkpoints)
        elif self.saved.checkpoint_dir:
            status.checkpoint_dir = str(Path(self.saved.checkpoint_dir).parent)
        last = loop.last_stats if loop is not None and loop.last_stats else self.saved.last_metrics
        status.last_metrics.update(last)
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
            if result.step < from_step:  # a resumed run redoing steps the caller already has
                continue
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
        if state in ENDED:
            yield _progress_message(run, trainer_pb2.WATCH_EVENT_END, progress, state, error)
            return
        if (progress, state) != shown:
            shown = (progress, state)
            yield _progress_message(run, trainer_pb2.WATCH_EVENT_PROGRESS, progress, state)


def _progress_message(
    run: Run, event: int, progress: Progress, state: int, error: str = ""
) -> trainer_pb2.StepMetrics:
    return trainer_pb2.StepMetrics(
        run_id=run.run_id,
        step=progress.step if event == trainer_pb2.WATCH_EVENT_PROGRESS else run.step,
        weight_version=run.weight_version,
        timestamp=time.time(),
        state=state,
        event=event,
        progress=progress_to_proto(progress),
        error=error,
    )
