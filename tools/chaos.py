"""The chaos test: a PPO run through the trainer's API survives a seeded schedule of SIGKILLs
(and restarts) of the policy, reward and trainer services and SIGSTOP/SIGCONT of a peer, and
ends exactly where an uninterrupted run of the same seed and config ends, bit for bit.

    python -m tools.chaos --seed 3              # by hand (`make chaos`); tests/test_chaos.py

On one set of processes (tools/chaos_stack.py), with the tiny test model:
  1. a baseline run, no events;
  2. the chaos run (same config and seed, another run id): each event waits until the run
     reaches its step and phase (generating, scoring, updating, syncing; followed through
     WatchRun), waits its small random delay, then SIGKILLs its target and restarts it on the
     same port (a trainer: then StartRun(resume=True) with the same config through the API),
     or freezes a peer for a few seconds; the run must then finish the step it was in;
  3. the checks of tools/chaos_checks.py, and a table of what was done.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from rlhf.v1 import trainer_pb2
from services.trainer.api.client import TrainerError
from tools.chaos_checks import checkpoint_differences, run_problems
from tools.chaos_stack import ChaosStack, RunFollower, Seen

AIMED_PHASES = ("generating", "scoring", "updating", "syncing")
"""The phases of a step an event can be aimed at (services/trainer/orchestrator/progress.py)."""
PEERS = ("policy", "reward")
"""The trainer's peers: what a SIGSTOP freezes (a frozen trainer only pauses its own run)."""
T = TypeVar("T")


@dataclass
class ChaosConfig:
    """A chaos session: the run, the schedule, and how long to wait for what."""

    seed: int = 0
    """Seeds the schedule (random.Random(seed)) and the run (ppo.seed)."""
    steps: int = 24
    """PPO steps of each run."""
    kills: int = 10
    """SIGKILLs, dealt in turn to each target (kill_policy decides whether the policy is one)."""
    kill_policy: bool = True
    """Kill the policy service too. Off, the kills go to reward and trainer only."""
    stops: int = 1
    """SIGSTOP/SIGCONT pairs, each of a random peer (policy or reward)."""
    stop_s: float = 3.0
    """How long a stopped peer stays frozen."""
    max_delay_s: float = 0.02
    """Upper bound of the random delay between reaching an event's phase and acting (a tiny
    step takes ~70 ms here, its scoring and syncing a few ms)."""
    first_step: int = 2
    """No event before this step: a resumed trainer needs step 1's checkpoint."""
    quiet_steps: int = 4
    """Last steps no event is aimed at: room for events that strike late (an event aimed at a
    point the run has passed strikes at once, where the run is, and the next waits for the run
    to finish that step)."""
    batch_size: int = 4
    """ppo.batch_size: prompts per step."""
    max_new_tokens: int = 6
    """generation.max_new_tokens: a short response keeps a step near 70 ms here."""
    step_retries: int = 8
    """run.step_retries: with retry_backoff_s, pauses of 0.25 * (2^7 - 1) s = 32 s in all,
    well above a peer's restart here (measured: the tiny policy ~6 s, reward ~1 s; a killed
    trainer stops its run, which waits for the resume instead)."""
    retry_backoff_s: float = 0.25
    """run.retry_backoff_s: the first pause between attempts; doubles each time."""
    event_timeout_s: float = 180.0
    """Longest wait for a run to reach an event's point, or to finish its step after one."""

    @property
    def kill_targets(self) -> tuple[str, ...]:
        return ("policy", "reward", "trainer") if self.kill_policy else ("reward", "trainer")


@dataclass(frozen=True)
class Event:
    action: str
    """"kill" (SIGKILL, then a restart) or "stop" (SIGSTOP, stop_s, SIGCONT)."""
    target: str
    """policy, reward or trainer (a stop: policy or reward)."""
    step: int
    """The step the event is aimed at."""
    phase: str
    """The phase of that step it is aimed at (one of AIMED_PHASES)."""
    delay_s: float
    """Pause between seeing the run reach the point and acting."""


@dataclass
class Outcome:
    """What happened to one event: where the run was when it struck, and whether the run
    finished the step it was in."""

    event: Event
    at: Seen | None = None
    """The run as seen when the signal went out; None: the run never got there."""
    restart_s: float = 0.0
    """Kill to serving again (a trainer: to StartRun(resume=True) answered)."""
    survived: bool = False
    """The run finished the step it was in, and did not fail."""
    note: str = ""
    """Why not, when it did not."""


@dataclass
class ChaosReport:
    outcomes: list[Outcome]
    """One per event of the chaos run, in order (the schedule stops at the first not survived)."""
    problems: list[str] = field(default_factory=list)
    """Every failed check; empty when the run survived everything."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of the parts: start, baseline, chaos, total."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        made = [o for o in self.outcomes if o.event.action == "kill" and o.at is not None]
        stops = [o for o in self.outcomes if o.event.action == "stop" and o.at is not None]
        survived = sum(o.survived for o in made)
        lines = [f"chaos: kills survived {survived} / kills made {len(made)}, stops {len(stops)}"]
        lines.append(f"  {'#':>2} {'event':<5} {'target':<8} {'aimed':<13} {'struck':<13} "
                     f"{'delay':>5} {'back_s':>6}  survived")  # fmt: skip
        for i, o in enumerate(self.outcomes, 1):
            e = o.event
            struck = f"{o.at.step}/{o.at.phase}" if o.at else "-"
            lines.append(
                f"  {i:>2} {e.action:<5} {e.target:<8} {f'{e.step}/{e.phase}':<13} "
                f"{struck:<13} {e.delay_s:>5.2f} {o.restart_s:>6.1f}  "
                f"{'yes' if o.survived else 'NO'}{'  ' + o.note if o.note else ''}"
            )
        lines.append("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        lines += [f"  FAILED CHECK: {p}" for p in self.problems]
        return "\n".join(lines)


def make_schedule(config: ChaosConfig) -> list[Event]:
    """The seeded events, in run order: kills dealt in turn over the targets, then shuffled;
    each event in a step of its own (drawn without replacement) at a random phase of it.

    One event per step: the run must finish the step an event struck in before the next event
    is looked for, so events aimed at neighbouring points would strike later and later and could
    run past the end of the run."""
    rng = random.Random(config.seed)
    targets = config.kill_targets
    actions = [("kill", targets[i % len(targets)]) for i in range(config.kills)]
    actions += [("stop", rng.choice(PEERS)) for _ in range(config.stops)]
    rng.shuffle(actions)
    last = config.steps - config.quiet_steps
    steps = range(config.first_step, last + 1)
    if len(actions) > len(steps):
        raise ValueError(
            f"{len(actions)} events do not fit in steps {config.first_step}..{last} (one per "
            "step): raise steps or lower kills/stops"
        )
    return [
        Event(
            action,
            target,
            step,
            rng.choice(AIMED_PHASES),
            round(rng.uniform(0, config.max_delay_s), 3),
        )
        for (action, target), step in zip(actions, sorted(rng.sample(steps, len(actions))))
    ]


def run_config(config: ChaosConfig, model: Path, output_dir: Path) -> str:
    """The run's config YAML: the tiny model, a short run, a checkpoint every step (a killed
    trainer redoes at most one step), retries that outlast a restart."""
    return yaml.safe_dump(
        {
            "ppo": {
                "model_name": str(model),
                "batch_size": config.batch_size,
                "mini_batch_size": 2,
                "ppo_epochs": 1,
                "learning_rate": 1e-3,
                "seed": config.seed,
                "log_with": "jsonl",
            },
            "generation": {"max_new_tokens": config.max_new_tokens},
            "run": {
                "steps": config.steps,
                "save_every": 1,
                "output_dir": str(output_dir),
                "step_retries": config.step_retries,
                "retry_backoff_s": config.retry_backoff_s,
            },
        }
    )


class Driver:
    """Starts one run on the stack and applies a schedule to it."""

    def __init__(self, stack: ChaosStack, config: ChaosConfig, run_id: str, yaml_text: str):
        self.stack, self.config, self.run_id, self.yaml = stack, config, run_id, yaml_text
        self.client = stack.trainer_client()
        self.client.start(trainer_pb2.StartRunRequest(run_id=run_id, config_yaml=yaml_text))
        self.follower = RunFollower(self.client, run_id)

    def apply(self, schedule: list[Event]) -> list[Outcome]:
        """Each event in turn; stops at the first the run did not survive."""
        outcomes = []
        for event in schedule:
            outcome = self._apply(event)
            outcomes.append(outcome)
            if outcome.at is not None and not outcome.survived:
                break
        return outcomes

    def finish(self) -> trainer_pb2.RunStatus:
        """Waits for the run to end; its final status."""
        self.follower.wait_for(lambda s: s.terminal, self.config.event_timeout_s)
        try:
            return self.client.get(self.run_id)
        except TrainerError as err:  # e.g. a restart that failed: reported, not raised
            return trainer_pb2.RunStatus(run_id=self.run_id, error=str(err))
        finally:
            self.client.close()

    def _apply(self, event: Event) -> Outcome:
        outcome = Outcome(event)
        timeout = self.config.event_timeout_s
        seen = self.follower.wait_for(
            lambda s: s.terminal or s.reached(event.step, event.phase), timeout
        )
        if seen is None or seen.terminal:
            outcome.note = "the run ended (or stalled) before this point"
            return outcome
        time.sleep(event.delay_s)
        outcome.at = at = self.follower.seen
        try:
            if event.action == "stop":
                self.stack.freeze(event.target, self.config.stop_s)
            else:
                outcome.restart_s = self._kill_and_restart(event.target)
        except (TrainerError, RuntimeError) as err:  # a restart or the resume failed
            outcome.note = str(err).splitlines()[0][:120]
            return outcome
        done = self.follower.wait_for(lambda s: s.terminal or s.finished > at.finished, timeout)
        outcome.survived = done is not None and done.state != "FAILED"
        if not outcome.survived:
            outcome.note = (done.error if done else "no step finished in time")[:120]
        return outcome

    def _kill_and_restart(self, target: str) -> float:
        began = time.monotonic()
        self.stack.kill(target)
        self.stack.start(target)
        if target == "trainer":
            self.client.close()  # its follower's stream ended with the trainer
            self.client = self.stack.trainer_client()
            request = trainer_pb2.StartRunRequest(
                run_id=self.run_id, config_yaml=self.yaml, resume=True
            )
            self.client.start(request)
            self.follower = RunFollower(self.client, self.run_id)
        return time.monotonic() - began


def run_chaos(config: ChaosConfig, folder: Path, model: Path | None = None) -> ChaosReport:
    """Runs the baseline and the chaos run on one stack in `folder` (logs, certificates, runs),
    then the checks. `model`: a causal LM folder (default: a tiny random one made here)."""
    from tools.tiny import make_causal_lm

    began = time.monotonic()
    model = model or make_causal_lm(folder / "tiny-lm")
    stack = ChaosStack(model, folder)
    yaml_text = run_config(config, model, stack.output_dir)
    seconds: dict[str, float] = {}
    try:
        for kind in ("policy", "reward", "trainer"):
            stack.start(kind)
        seconds["start"] = time.monotonic() - began
        baseline = _timed(
            seconds, "baseline", lambda: _one_run(stack, config, "baseline", yaml_text, [])
        )
        schedule = make_schedule(config)
        chaos = _timed(
            seconds, "chaos", lambda: _one_run(stack, config, "chaos", yaml_text, schedule)
        )
    finally:
        stack.close()
    report = ChaosReport(chaos[1], _problems(stack.output_dir, config.steps, baseline, chaos))
    seconds["total"] = time.monotonic() - began
    report.seconds = seconds
    return report


def _problems(
    runs: Path,
    steps: int,
    baseline: tuple[trainer_pb2.RunStatus, list[Outcome]],
    chaos: tuple[trainer_pb2.RunStatus, list[Outcome]],
) -> list[str]:
    """Every check of both runs, then the chaos run's against the baseline's checkpoint."""
    found = _end_problems("baseline", baseline[0], steps) + _end_problems("chaos", chaos[0], steps)
    found += [f"{o.event}: {o.note or 'not survived'}" for o in chaos[1] if not o.survived]
    found += run_problems(runs / "baseline", steps) + run_problems(runs / "chaos", steps)
    differ = checkpoint_differences(runs / "chaos", runs / "baseline")
    return found + [f"not bit-identical to the baseline: {d}" for d in differ]


def _timed(seconds: dict[str, float], name: str, part: Callable[[], T]) -> T:
    began = time.monotonic()
    try:
        return part()
    finally:
        seconds[name] = time.monotonic() - began


def _one_run(
    stack: ChaosStack, config: ChaosConfig, run_id: str, yaml_text: str, schedule: list[Event]
) -> tuple[trainer_pb2.RunStatus, list[Outcome]]:
    driver = Driver(stack, config, run_id, yaml_text)
    outcomes = driver.apply(schedule)
    return driver.finish(), outcomes


def _end_problems(run_id: str, status: trainer_pb2.RunStatus, steps: int) -> list[str]:
    if status.state == trainer_pb2.RUN_STATE_COMPLETED and status.step == steps:
        return []
    state = trainer_pb2.RunState.Name(status.state)
    return [f"run {run_id}: {state} at step {status.step}/{steps} {status.error}".rstrip()]


def main(argv: list[str] | None = None) -> int:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(
        prog="python -m tools.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--stops", type=int, default=defaults.stops)
    parser.add_argument(
        "--no-policy-kills", action="store_true", help="kill reward and trainer only"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="logs, certificates, runs (default: a new temporary folder)"
    )
    args = parser.parse_args(argv)
    config = ChaosConfig(
        seed=args.seed, steps=args.steps, kills=args.kills, stops=args.stops,
        kill_policy=not args.no_policy_kills,
    )  # fmt: skip
    folder = args.work_dir or Path(tempfile.mkdtemp(prefix="rlhf-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {config.seed}, {config.steps} steps; logs and runs in {folder}")
    report = run_chaos(config, folder)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
