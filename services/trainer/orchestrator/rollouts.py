"""A step's rollout (prompts -> Generate -> Score) and, at run.max_staleness k >= 1, the worker
thread that produces it while the learner trains earlier steps.

`Sampling.sample` is the one rollout path of both modes: lock-step runs it in the loop's thread,
the worker in its own. The worker's ordering rules make an overlapped run as deterministic as a
lock-step one (so a resume is exact and two runs compare):
- it starts generating step t only once the loop has released step t-1-k (that step's weights
  are served, or its unpushed update counted: sync_every > 1); step <= 0: the run's start;
- the loop pushes step s's weights only after the worker's Generate of step s+k returned,
  so that Generate ran on exactly the weights of step s-1 (of t-1-k for t = s+k).
The worker never touches the learner or pushes: a Generate answered by a restarted policy
instance is handed to the loop (`resync`), which pushes at a point where the learner is at
rest, and the worker generates again. Failures travel as `Failed` entries and surface when the
loop takes that step's sample, at a step boundary.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from services.trainer.config import TrainConfig
from services.trainer.orchestrator.data import PromptSampler
from services.trainer.orchestrator.peers import PolicyTransport, Rollout
from services.trainer.orchestrator.progress import ProgressTracker
from services.trainer.orchestrator.rewards import RewardMixer, RewardSource
from services.trainer.orchestrator.samples import Failed, Sample
from services.trainer.orchestrator.weight_sync import Retrying, WeightSync

Resync = Callable[[str, Rollout], None]
"""(what, the answer that showed a restarted policy) -> the policy serves this run's weights."""


class StepFailed(RuntimeError):
    """A step could not be completed; it was not counted, logged or checkpointed."""


class Sampling:
    """Draws, generates and scores one step's sample; the same code in both modes."""

    def __init__(
        self,
        config: TrainConfig,
        policy: PolicyTransport,
        rewards: RewardMixer,
        sync: WeightSync,
        retrying: Retrying,
        progress: ProgressTracker,
    ) -> None:
        self.config = config
        self.policy = policy
        self.rewards = rewards
        self.sync = sync
        self.retrying = retrying
        self.progress = progress

    def sample(
        self,
        step: int,
        sampler: PromptSampler,
        sources: Callable[[], list[RewardSource]],
        resync: Resync,
        enter: Callable[[str, int], None],
    ) -> Sample:
        """Step `step`'s sample, scored by `sources()` (the step's snapshot, taken when its
        scoring begins). `enter(phase, step)`: where the step is. On failure the sampler is
        left after the prompts drawn."""
        before = sampler.state_dict()
        # 1. Rollout: the policy service samples a response per prompt.
        prompts = sampler.next_batch(self.config.ppo.batch_size)
        times: dict[str, float] = {}
        enter("generating", step)
        times["timeline/generate_start"], t = time.time(), time.perf_counter()
        rollout = self.generate(step, prompts, resync)
        times["time/generate"] = time.perf_counter() - t
        times["timeline/generate_end"] = time.time()

        # 2. Reward: every source scores every (prompt, response); the reward is their
        #    weighted sum. Sources are fixed for the whole step (a swap applies to later ones).
        enter("scoring", step)
        snapshot = sources()
        times["timeline/score_start"], t = time.time(), time.perf_counter()
        scores, per_source = self.retrying(
            f"step {step}: score",
            lambda: self.rewards.score(prompts, rollout.response_texts, snapshot),
        )
        times["time/score"] = time.perf_counter() - t
        times["timeline/score_end"] = time.time()
        return Sample(
            step,
            prompts,
            rollout,
            scores,
            per_source,
            basis=rollout.weight_version,
            times=times,
            sampler_before=before,
            sampler_after=sampler.state_dict(),
        )

    def generate(self, step: int, prompts: list[str], resync: Resync) -> Rollout:
        """The step's rollout, sampled from this run's weights: a policy service that restarted
        (or lost them) gets them pushed again (`resync`) and generates again with the same
        seed, at most run.step_retries times a step. Nothing sampled from other weights goes
        further."""
        gen, seed = self.config.generation, self.config.ppo.seed * 100_003 + step
        retries = self.config.run.step_retries
        for attempt in range(retries + 1):
            rollout = self.retrying(
                f"step {step}: generate", lambda: self.policy.generate(prompts, gen, seed=seed)
            )
            if self.sync.serves_ours(rollout):
                return rollout
            if attempt == retries:
                break
            self.progress.retried(
                f"the policy service at {self.policy.address} answered from instance "
                f"{rollout.instance_id or '(unnamed)'} at weight version {rollout.weight_version}, "
                f"not this run's version {self.sync.version}: it restarted; pushing the "
                "weights again"
            )
            resync(f"step {step}: push weights to a restarted policy", rollout)
        raise StepFailed(
            f"step {step}: the policy service at {self.policy.address} still did not serve this "
            f"run's weights (version {self.sync.version}) after {retries} re-pushes; it "
            f"answered from instance {rollout.instance_id or '(unnamed)'} at version "
            f"{rollout.weight_version}"
        )


class RolloutWorker:
    """The thread that produces samples `first`..`last` ahead of the loop, k steps at most.

    Everything shared is guarded by one condition; the loop's waits (`take`, `await_generated`,
    `finish_pending`) run the worker's resync requests with the loop's own callback, since only
    the loop may push weights.
    """

    def __init__(
        self,
        sampling: Sampling,
        sampler: PromptSampler,
        first: int,
        last: int,
        max_staleness: int,
        released: int,
        pending: list[Sample],
    ) -> None:
        """`sampler`: the worker's own, at the state after the prompts of `pending` (samples
        restored by a resume, handed out first); `released`: the last step whose weights are
        served (the run's step when the worker starts)."""
        self.sampling = sampling
        self.sampler = sampler
        self.next = first
        self.last = last
        self.k = max_staleness
        self.released = released
        self.generated = first - 1
        """The last step whose Generate returned (or failed)."""
        self.queue: deque[Sample | Failed] = deque(pending)
        self.phase: tuple[int, str] = (first, "generating")
        self._cond = threading.Condition()
        self._stopping = False
        self._ended = False
        self._request: tuple[str, Rollout] | None = None
        self._served = 0
        self._thread = threading.Thread(target=self._work, name="rollout-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- the worker's side -------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    step = self.next
                    while not (
                        self._stopping or step > self.last or self.released >= step - 1 - self.k
                    ):
                        self._cond.wait()
                    if self._stopping or step > self.last:
                        return
                    before = self.sampler.state_dict()
                if not self._produce(step, before):
                    return
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _produce(self, step: int, before: dict[str, int]) -> bool:
        """Step `step`'s sample into the queue; False after a failure (the worker ends)."""
        rewards, scoring = self.sampling.rewards, False

        def sources() -> list[RewardSource]:
            nonlocal scoring
            scoring = True  # from here a swap applies to later steps (rewards.py)
            return rewards.begin_step(step)

        try:
            sample = self.sampling.sample(step, self.sampler, sources, self._resync, self._enter)
        except BaseException as err:  # noqa: BLE001 - surfaces when the loop takes the step
            with self._cond:
                self.generated = max(self.generated, step)
                self.queue.append(Failed(step, err, before))
                self._cond.notify_all()
            return False
        finally:
            if scoring:
                rewards.end_step()
        with self._cond:
            self.queue.append(sample)
            self.next = step + 1
            self._cond.notify_all()
        return True

    def _enter(self, phase: str, step: int) -> None:
        with self._cond:
            if phase == "scoring":  # the Generate returned: the loop may push past it
                self.generated = step
            self.phase = (step, phase)
            self._cond.notify_all()

    def _resync(self, what: str, seen: Rollout) -> None:
        """Asks the loop to make the policy serve this run's weights again, and waits."""
        with self._cond:
            self._request = (what, seen)
            served = self._served
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._stopping or self._served > served)
            if self._stopping:
                raise StepFailed(f"{what}: the run ended while the weights were re-pushed")

    # --- the loop's side ---------------------------------------------------------------------
    def release(self, step: int) -> None:
        """Step `step` is finished and its weights served (or its update counted)."""
        with self._cond:
            self.released = max(self.released, step)
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], resync: Resync) -> None:
        """Waits until `ready()` (called under the lock), running resync requests meanwhile."""
        with self._cond:
            while True:
                if self._request is not None:
                    what, seen = self._request
                    self._request = None
                    self._cond.release()
                    try:
                        resync(what, seen)
                    finally:
                        self._cond.acquire()
                        self._served += 1
                        self._cond.notify_all()
                    continue
                if ready():
                    return
                self._cond.wait()

    def take(self, step: int, resync: Resync, enter: Callable[[str, int], None]) -> Sample:
        """Step `step`'s sample (waiting for it); raises the step's failure."""
        shown: tuple[int, str] | None = None

        def ready() -> bool:
            nonlocal shown
            if self.queue:
                return True
            if self._ended:
                raise StepFailed(f"step {step}: the rollout worker ended without its sample")
            if self.phase != shown and self.phase[0] == step:
                shown = self.phase
                enter(self.phase[1], step)
            return False

        self._wait(ready, resync)
        with self._cond:
            entry = self.queue[0]
            if entry.step != step:
                raise AssertionError(f"the rollout worker handed step {entry.step} for {step}")
            if isinstance(entry, Failed):
                raise entry.error  # left queued: first_failure_before() names its prompts
            self.queue.popleft()
        return entry

    def await_generated(self, step: int, resync: Resync) -> None:
        """Until step `step`'s Generate returned (or the worker failed or ended)."""
        self._wait(lambda: self.generated >= min(step, self.last) or self._ended, resync)

    def finish_pending(self, step: int, resync: Resync) -> list[Sample]:
        """At the boundary of step `step`: the samples the worker may produce before its next
        release (steps up to step + k), once all are finished; a failure ends the list."""
        target = min(step + self.k, self.last)

        def finished() -> bool:
            return self._ended or (self.queue and self.queue[-1].step >= target) or target <= step

        self._wait(lambda: bool(finished()), resync)
        with self._cond:
            pending = []
            for entry in self.queue:
                if isinstance(entry, Failed):
                    break
                pending.append(entry)
            return pending

    def first_failure_before(self) -> dict[str, int] | None:
        """The sampler state before the prompts of a queued failure, if one is queued."""
        with self._cond:
            failed = [e for e in self.queue if isinstance(e, Failed)]
            return failed[0].sampler_before if failed else None

    def stop(self) -> None:
        """Ends the thread once its current call returns; what it still produces is dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()


class Prefetch:
    """The loop's side of run.max_staleness >= 1: the worker it runs, and the samples a resume
    restored (made before its checkpoint), which a new worker hands out first."""

    def __init__(self, sampling: Sampling, config: TrainConfig) -> None:
        self.sampling = sampling
        self.config = config
        self.worker: RolloutWorker | None = None
        self.restored: list[Sample] = []

    def start(self, step: int, finished: int, sampler: PromptSampler) -> RolloutWorker:
        """The running worker, or a new one producing from `step` on (after the restored
        samples). `finished`: the loop's last finished step; `sampler`: the loop's, at the
        state after the prompts of every sample made so far."""
        if self.worker is not None:
            return self.worker
        pending, self.restored = self.restored, []
        own = PromptSampler(sampler.prompts, sampler.seed)
        own.load_state_dict(pending[-1].sampler_after if pending else sampler.state_dict())
        first = pending[-1].step + 1 if pending else step
        run = self.config.run
        self.worker = RolloutWorker(
            self.sampling, own, first, run.steps, run.max_staleness, finished, pending
        )
        self.worker.start()
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def rewind(self, failed: Sample | None) -> dict[str, int] | None:
        """A step failed before its update (`failed`: its sample, if it was taken): stops the
        worker, dropping what it made; returns the sampler state before the failed step's
        prompts (None: unknown, the loop's is right)."""
        before = failed.sampler_before if failed is not None else None
        if before is None and self.worker is not None:
            before = self.worker.first_failure_before()
        self.stop()
        return before

    def pending(self, step: int, resync: Resync) -> list[Sample]:
        """At the boundary of step `step`: the samples made for the steps after it, finished."""
        if self.worker is None:
            return list(self.restored)
        return self.worker.finish_pending(step, resync)
