"""Following a run on a trainer service (`rlhf watch`, and `rlhf train --trainer` and `rlhf stop
--wait` after they have asked): a progress display fed by WatchRun, which outlasts a trainer
restart. Import-light like commands.py: the heavy imports happen inside the functions."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rlhf.command_errors import CommandError

if TYPE_CHECKING:  # annotations only
    from rlhf.v1.trainer_pb2 import StepMetrics
    from services.trainer.api.client import TrainerClient
    from services.trainer.api.display import ProgressDisplay


def resume_hint(trainer: str, run_id: str) -> str:
    return (
        f"the trainer stopped while it ran: rlhf train --trainer {trainer} --run-id {run_id} "
        "--resume"
    )


def state_name(state: int) -> str:
    from rlhf.v1 import trainer_pb2

    return trainer_pb2.RunState.Name(state).removeprefix("RUN_STATE_")


RECONNECT_S = 300.0
"""How long `rlhf watch` (and `rlhf train --trainer`, `rlhf stop --wait`) waits for a trainer
that went away mid-watch (restarted, its pod rescheduled) before it gives up."""
_GONE = ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED")
"""Statuses of a watch broken by the trainer going away, not by a refusal."""


def watch_run(
    client: TrainerClient, run_id: str, from_step: int, reconnect_s: float = RECONNECT_S
) -> int:
    """Follows a run to its end with a progress display; prints its terminal state. Returns 0
    when it completed or was stopped, 1 when it failed or was interrupted.

    A trainer that goes away mid-watch (killed, restarted, shut down) is waited for up to
    `reconnect_s`; the watch then goes on from the step after the last one shown, which the
    restarted trainer replays from the run's metrics file: no row is lost or shown twice."""
    from rlhf.v1 import trainer_pb2
    from services.trainer.api.client import TrainerError
    from services.trainer.api.display import ProgressDisplay

    status = client.get(run_id)
    display = ProgressDisplay(status.total_steps)
    shown = from_step - 1 if from_step else status.step  # the last step the display has
    end = None
    try:
        while end is None:
            try:
                for message in client.watch(status.run_id, shown + 1):
                    if message.event == trainer_pb2.WATCH_EVENT_END:
                        end = message
                        break
                    if message.event == trainer_pb2.WATCH_EVENT_PROGRESS:
                        _show_progress(display, message)
                    else:
                        display.step(message.step, dict(message.metrics))
                        shown = message.step
            except TrainerError as err:
                if err.code not in _GONE:
                    raise
            if end is None:  # the stream ended or broke without END: the trainer went away
                display.say(
                    f"the trainer at {client.address} went away during the watch; waiting up "
                    f"to {reconnect_s:.0f} s for it to come back"
                )
                _wait_for_trainer(client, status.run_id, reconnect_s)
                display.say(f"reconnected: following run {status.run_id} from step {shown + 1}")
    finally:
        display.close()
    print(f"run {status.run_id}: {state_name(end.state)} at step {end.step}/{status.total_steps}")
    if end.error:
        print(f"error: {end.error}", file=sys.stderr)
    if end.state == trainer_pb2.RUN_STATE_INTERRUPTED:
        print(resume_hint(client.address, status.run_id), file=sys.stderr)
    return 0 if end.state in (trainer_pb2.RUN_STATE_COMPLETED, trainer_pb2.RUN_STATE_STOPPED) else 1


def _show_progress(display: ProgressDisplay, message: StepMetrics) -> None:
    from rlhf.v1 import trainer_pb2

    p = message.progress
    phase = trainer_pb2.RunPhase.Name(p.phase).removeprefix("RUN_PHASE_").lower()
    note = "stopping" if message.state == trainer_pb2.RUN_STATE_STOPPING else ""
    display.phase(phase, p.step, p.phase_elapsed_s, p.retries, note, p.last_error)


def _wait_for_trainer(client: TrainerClient, run_id: str, within_s: float) -> None:
    """Returns once the trainer answers GetRun for `run_id` again; CommandError after
    `within_s`, or at once when it answers that it does not know the run."""
    import time

    from services.trainer.api.client import TrainerError

    deadline = time.monotonic() + within_s
    while True:
        try:
            client.get(run_id)
            return
        except TrainerError as err:
            if err.code not in _GONE:
                raise
            if time.monotonic() >= deadline:
                raise CommandError(
                    f"the trainer at {client.address} went away while run {run_id} was watched "
                    f"and did not answer again within {within_s:.0f} s; `rlhf status` shows "
                    "where the run is once it is back"
                ) from None
        time.sleep(1.0)
