"""The coordinating loop: generate -> score -> PPO step -> push weights -> log, step after step.

Read it top to bottom in `TrainingLoop.run_step`; everything else is set-up, checkpoints and
retries. The policy and reward sources are reached through transports (peers.py says what the
loop needs of them; transports.py speaks gRPC, bench/local_transports.py runs in one process),
so the loop never sees the wire. Which weights the policy serves, under which version number,
and what to do when it restarts is weight_sync.py's job.

What a step leaves behind: the step counter, the metrics row and a checkpoint advance only
when the whole step (push included) succeeded. A failure before the update leaves nothing
changed (the prompts are drawn again next time); a failure in the update or the push leaves
the learner mid-step, so the run stops without writing a checkpoint: the last boundary
checkpoint stays the latest, and a resume redoes the step exactly.

Under torchrun this loop runs on rank 0 only; `self.followers` (learner_group.py) tells the
other ranks each learner call (start, prepare, update, and FSDP's gathers) before rank 0 makes
it, so the learner's collectives line up.

With run.max_staleness k >= 1 the step's rollout (prompts, Generate, Score) is made ahead by
a worker thread while the learner trains earlier steps (rollouts.py has its ordering rules);
the step takes it, trains on it and pushes once the worker's Generate of step + k returned.
The same rules hold: a worker's failure fails the step that takes its sample, at a boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from rlhf.defaults import DEFAULT_OUTPUT_DIR
from rlhf.logs import ContextLogger
from services.trainer.config import TrainConfig
from services.trainer.learner import parallel
from services.trainer.learner.batch import PPOBatch
from services.trainer.orchestrator.checkpoint import latest_checkpoint, save_checkpoint
from services.trainer.orchestrator.data import PromptSampler, load_prompts
from services.trainer.orchestrator.drift import logprob_drift
from services.trainer.orchestrator.learner_group import Followers
from services.trainer.orchestrator.metrics import MetricsLog
from services.trainer.orchestrator.model_check import check_served_model, trainer_model_facts
from services.trainer.orchestrator.peers import (
    FatalError,
    PolicyFacts,
    PolicyTransport,
    Rollout,
    TransientError,
)
from services.trainer.orchestrator.progress import ProgressTracker
from services.trainer.orchestrator.rewards import RewardMixer, RewardSource
from services.trainer.orchestrator.rollouts import Prefetch, Sampling, StepFailed
from services.trainer.orchestrator.samples import Sample, overlap_s
from services.trainer.orchestrator.trainer_state import read_state, write_state
from services.trainer.orchestrator.weight_sync import WeightSync

log = logging.getLogger("rlhf.trainer.loop")
T = TypeVar("T")


@dataclass
class StepResult:
    step: int
    weight_version: int
    stats: dict[str, float]


class TrainingLoop:
    """One PPO run against one policy transport and a mixer of reward sources."""

    def __init__(
        self,
        config: TrainConfig,
        policy: PolicyTransport,
        rewards: RewardMixer,
        resume: bool = False,
        progress: ProgressTracker | None = None,
    ) -> None:
        """`progress`: where to report phases and retries (the control API passes its run's, so
        retries while loading show too); default: a tracker of the loop's own."""
        self.config = config
        self.policy = policy
        self.rewards = rewards
        run = config.run
        if not run.run_id:
            run.run_id = time.strftime("run-%Y%m%d-%H%M%S")
        self.folder = Path(run.output_dir or DEFAULT_OUTPUT_DIR) / run.run_id
        self.checkpoints = self.folder / "checkpoints"
        self.step = 0
        """The last step finished completely (its weights pushed, its metrics row written)."""
        self._mid_step: int | None = None
        """A step whose update changed the learner but did not finish: the run cannot go on."""
        self.last_stats: dict[str, float] = {}
        self.log = ContextLogger(log, {"run": run.run_id})
        self.progress = progress or ProgressTracker()
        self.checkpointed: list[Callable[[Path], None]] = []
        """Called with each checkpoint folder once it is complete (the API records the run)."""

        ppo = config.ppo
        # The model check comes before loading the model: a wrong policy is refused at once.
        facts = self._retrying("reading the policy service's facts", self.policy.facts)
        check_served_model(trainer_model_facts(ppo.model_name), facts.model, policy.address)
        # Under torchrun the other ranks build their replica (DDP) or shard (FSDP) alongside.
        self.followers = Followers(parallel.current())
        self.followers.start(config)
        try:
            self._build(config, resume, facts)
        except BaseException:
            self.followers.end()
            raise

    def _build(self, config: TrainConfig, resume: bool, facts: PolicyFacts) -> None:
        """The learner, prompts, metrics and weight sync; the resume's state; the first push."""
        from services.trainer.learner.ppo_trainer import PPOTrainer
        from services.trainer.learner.value_head import PolicyWithValueHead

        ppo, run, policy, rewards = config.ppo, config.run, self.policy, self.rewards
        self.model = PolicyWithValueHead.from_config(ppo)
        self.tokenizer = self.model.tokenizer
        # The reference: the base with LoRA adapters off, or a frozen copy (PPOTrainer decides).
        self.trainer = PPOTrainer(ppo, self.model, self.tokenizer, parallel=parallel.current())
        self.sampler = PromptSampler(load_prompts(run.prompts), seed=ppo.seed)
        self.metrics = MetricsLog(self.folder, ppo.log_with)
        self.sync = WeightSync(
            policy,
            self.folder,
            self._servable,
            self._retrying,
            self.log,
        )

        self.sampling = Sampling(config, policy, rewards, self.sync, self._retrying, self.progress)
        self.prefetch = Prefetch(self.sampling, config)
        self._trained: deque[tuple[float, float]] = deque(maxlen=run.max_staleness + 1)
        """The last steps' training intervals (unix times), for time/overlap."""

        if resume:
            self._restore()
        checkpoint_version = self.weight_version
        # Unless the service serves the base model as loaded (a fresh run's start), make it
        # serve this run's weights before the first Generate.
        self.sync.begin(facts, resumed=resume)
        for sample in self.prefetch.restored:  # same weights, under the resume's version number
            sample.basis += self.weight_version - checkpoint_version

    @property
    def weight_version(self) -> int:
        """The weight version of the run: the last pushed (0: the base model as loaded)."""
        return self.sync.version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        self.sync.version = version

    # --- the loop ----------------------------------------------------------------------------
    def run(
        self,
        stop: threading.Event | None = None,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> str:
        """Runs steps until run.steps or `stop`; checkpoints at the end. Returns why it ended.

        A step that fails ends the run (the exception propagates); the state is checkpointed
        only if it is a step boundary's (the failure came before the update).
        """
        stop = stop or threading.Event()
        reason = "completed"
        try:
            while self.step < self.config.run.steps:
                if stop.is_set():
                    reason = "stopped"
                    break
                result = self.run_step()
                if on_step is not None:
                    on_step(result)
                every = self.config.run.save_every
                if every and self.step % every == 0 and self.step < self.config.run.steps:
                    self.save()
        finally:
            try:
                at_boundary = self._mid_step is None
                if at_boundary and self.step > 0:
                    if latest_checkpoint(self.checkpoints) != self._step_folder():
                        self.save()
            finally:
                self.prefetch.stop()
                self.metrics.close()
                self.followers.end()
        return reason

    def run_step(self) -> StepResult:
        """One PPO step. Nothing is counted, logged or checkpointed unless every phase succeeds."""
        if self._mid_step is not None:
            raise StepFailed(
                f"step {self._mid_step} failed after its update changed the learner; the run "
                f"cannot go on: resume it from its last checkpoint"
            )
        step = self.step + 1
        if self.config.run.max_staleness:
            try:
                return self._run_overlapped_step(step)
            except FatalError as err:
                raise StepFailed(f"step {step}: {err}") from err
        sources = self.rewards.begin_step(step)  # a swap during this step applies from the next
        try:
            return self._run_step(step, sources)
        except FatalError as err:
            raise StepFailed(f"step {step}: {err}") from err
        finally:
            self.rewards.end_step()

    def _run_step(self, step: int, sources: list[RewardSource]) -> StepResult:
        """Lock-step (run.max_staleness 0): this step's rollout, then its update and push."""
        run = self.config.run
        t_step = time.perf_counter()
        sampler_state = self.sampler.state_dict()
        try:
            sample = self.sampling.sample(
                step, self.sampler, lambda: sources, self.sync.resync, self.progress.enter
            )
            timings = dict(sample.times)
            batch, drift = self._prepare(step, sample, timings)
        except BaseException:
            self.sampler.load_state_dict(sampler_state)  # the same prompts again next time
            self.rewards.scored_through(step - 1)  # a swap from now on applies to it
            raise

        # 4. The PPO update (ppo_epochs over shuffled mini-batches), KL controller update. From
        #    here until the push succeeds the learner is mid-step.
        self._mid_step = step
        stats = self._update(batch, timings)

        # 5. Weight sync: the next Generate must use the new policy.
        self.progress.enter("syncing", step)
        if step % run.sync_every == 0 or step == run.steps:
            self._synced(step, timings, t_step, push=True)
        else:
            self._synced(step, timings, t_step, push=False, moved=True)

        # 6. Statistics under the classic names, plus each reward source's mean and the drift.
        stats.update(timings)
        stats.update(drift)
        return self._finish(step, stats, sample)

    def _run_overlapped_step(self, step: int) -> StepResult:
        """run.max_staleness k >= 1: the step trains on a sample the rollout worker made while
        earlier steps trained (from the weights of step - 1 - k or newer; rollouts.py)."""
        run = self.config.run
        worker = self.prefetch.start(step, self.step, self.sampler)
        worker.release(step - 1)  # the weights of step - 1 are served: the worker may go on
        t_step = time.perf_counter()
        sample: Sample | None = None
        try:
            sample = worker.take(step, self.sync.resync, self.progress.enter)
            timings = dict(sample.times)
            staleness = self.weight_version - sample.basis
            batch, drift = self._prepare(step, sample, timings)
        except BaseException:
            self._rewind(step, sample)
            raise
        self.sampler.load_state_dict(sample.sampler_after)

        # 4. The update, as in lock-step.
        self._mid_step = step
        stats = self._update(batch, timings)

        # 5. Weight sync, once the worker's Generate of step + k returned: that Generate used
        #    the weights of step - 1 (a restarted policy meanwhile gets this step's, in full).
        self.progress.enter("syncing", step)
        self.sync.learner_moved()
        worker.await_generated(step + run.max_staleness, self._resync_after_update)
        due = step % run.sync_every == 0 or step == run.steps
        self._synced(step, timings, t_step, push=due and not self.sync.current)

        stats.update(timings)
        stats.update(drift)
        stats["rollout/staleness"] = float(staleness)
        return self._finish(step, stats, sample)

    def _synced(
        self,
        step: int,
        timings: dict[str, float],
        t_step: float,
        push: bool,
        moved: bool = False,
    ) -> None:
        """5. The timed weight sync (`push`: this step's weights go out; `moved`: they do not,
        and the learner is ahead of what the policy serves); then the step counts as finished."""
        timings["timeline/sync_start"], t = time.time(), time.perf_counter()
        if push:
            self.sync.push_step(f"step {step}: update weights")
        elif moved:
            self.sync.learner_moved()
        timings["time/weight_sync"] = time.perf_counter() - t
        timings["timeline/sync_end"] = time.time()
        timings["time/step"] = time.perf_counter() - t_step
        self._mid_step = None
        self.step = step

    def _prepare(
        self, step: int, sample: Sample, timings: dict[str, float]
    ) -> tuple[PPOBatch, dict[str, float]]:
        """3. Old log-probs, values and reference log-probs (the trainer's forward passes), at
        the learner's current weights; the drift from the sampler's log-probs."""
        queries = [torch.tensor(q, dtype=torch.long) for q in sample.rollout.query_ids]
        responses = [torch.tensor(r, dtype=torch.long) for r in sample.rollout.response_ids]
        self.progress.enter("updating", step)
        timings["timeline/train_start"], t = time.time(), time.perf_counter()
        rollout = sample.rollout
        self.followers.prepare(rollout.query_ids, rollout.response_ids, list(sample.scores))
        batch = self.trainer.prepare(
            queries, responses, torch.tensor(sample.scores, dtype=torch.float32)
        )
        timings["time/ref_values"] = time.perf_counter() - t
        drift = logprob_drift(sample.rollout.response_logprobs, batch.logprobs, batch.mask)
        return batch, drift

    def _update(self, batch: PPOBatch, timings: dict[str, float]) -> dict[str, float]:
        """4. ppo_epochs over shuffled mini-batches, then the KL controller."""
        t = time.perf_counter()
        self.followers.update()
        stats = self.trainer.update(batch)
        timings["time/update"] = time.perf_counter() - t
        timings["timeline/train_end"] = time.time()
        return stats

    def _finish(self, step: int, stats: dict[str, float], sample: Sample) -> StepResult:
        """The finished step's metrics row and log line."""
        stats.update(sample.stats())
        stats["weight_version"] = float(self.weight_version)
        stats.setdefault("rollout/staleness", 0.0)
        stats["time/overlap"] = overlap_s(stats, self._trained)
        self._trained.append((stats["timeline/train_start"], stats["timeline/train_end"]))
        self.metrics.write(step, self.weight_version, stats)
        self.last_stats = stats
        self.progress.enter("idle", step)
        self.log.info(
            "step done",
            extra={
                "step": step,
                "weight_version": self.weight_version,
                "reward_mean": round(stats["env/reward_mean"], 4),
                "kl": round(stats.get("objective/kl", float("nan")), 4),
                "step_s": round(stats["time/step"], 2),
            },
        )
        return StepResult(step, self.weight_version, stats)

    def _rewind(self, step: int, failed: Sample | None) -> None:
        """Step `step` failed before its update: the worker stops, what it made after the last
        finished step is dropped and the sampler goes back to before the failed step's
        prompts, so the step draws them again (and a swap from now on applies to it)."""
        before = self.prefetch.rewind(failed)
        if before is not None:
            self.sampler.load_state_dict(before)
        self.rewards.scored_through(step - 1)

    def _resync_after_update(self, what: str, seen: Rollout) -> None:
        """A worker's Generate met a restarted policy after this step's update: the weights it
        was to sample from may be gone from the learner, so the policy gets the learner's
        current ones, in full, as a new version (a smaller staleness, within the bound)."""
        self.sync.learner_moved()
        self.sync.resync(what, seen)

    # --- weights, retries, checkpoints -------------------------------------------------------
    def _servable(self, full: bool) -> dict[str, torch.Tensor]:
        """The weights a push sends: all of them, or (False) those training changes."""
        self.followers.weights(trained_only=not full)
        return self.trainer.servable_state_dict(trained_only=not full)

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """Calls `call`, retrying a TransientError with backoff (the one retry layer)."""
        run = self.config.run
        pause = run.retry_backoff_s
        for attempt in range(1, run.step_retries + 1):
            try:
                return call()
            except TransientError as err:
                if attempt == run.step_retries:
                    raise StepFailed(f"{what} failed {attempt} times; last: {err}") from err
                self.progress.retried(str(err))
                self.log.warning(
                    f"{what} failed; retrying",
                    extra={"attempt": attempt, "reason": str(err)},
                )
                time.sleep(pause)
                pause *= 2
        raise AssertionError("unreachable")

    def _step_folder(self) -> Path:
        return self.checkpoints / f"step-{self.step:06d}"

    def save(self) -> Path:
        """Writes a checkpoint atomically: the servable policy, and all state to resume (with
        run.max_staleness >= 1, the samples prefetched for the next steps too, once finished)."""
        pending = self._pending()
        sampler = pending[-1].sampler_after if pending else self.sampler.state_dict()

        def write(folder: Path) -> None:
            self.followers.save(self.step)  # FSDP: every rank writes its shard
            try:
                whole = self.trainer.whole_policy() if self.followers.sharded else None
                self.model.save_pretrained(folder / "policy", whole=whole)
                self._write_state(folder, sampler, pending)
            finally:
                self.followers.saved()

        self.progress.enter("checkpointing", self.step)
        path = save_checkpoint(self.checkpoints, self.step, write, self.config.run.keep_checkpoints)
        self.log.info("checkpoint written", extra={"step": self.step, "path": str(path)})
        for listener in list(self.checkpointed):
            listener(path)
        return path

    def _write_state(self, folder: Path, sampler: dict[str, int], pending: list[Sample]) -> None:
        """All state to resume, beside the policy folder (trainer_state.py's format)."""
        write_state(  # safetensors + JSON: resuming loads no pickle (trainer_state.py)
            folder,
            {
                "step": self.step,
                "weight_version": self.weight_version,
                # model's trainable weights, optimizer, KL controller, RNG states
                "trainer": self.trainer.state_dict(include_model=True),
                "sampler": sampler,  # after the prompts of the pending samples
                "rewards": [str(s.spec) for s in self.rewards.sources],
                "config": asdict(self.config),
                "pending": [p.to_state(self.weight_version) for p in pending],
                # Clock readings, for the pending samples' time/overlap only: a checkpoint
                # without them (lock-step, a run's last) holds none, and compares equal.
                "trained": [list(interval) for interval in self._trained] if pending else [],
                # FSDP: the trainer state is rank 0's shard (the others' in shards/rank-R).
                "data_parallel": self._parallel_layout(),
            },
        )

    def _parallel_layout(self) -> dict[str, Any] | None:
        """How the learner state of a checkpoint is split: None (whole), or FSDP's ranks."""
        dp = self.followers.dp
        return {"strategy": "fsdp", "world": dp.world} if dp and self.followers.sharded else None

    def _pending(self) -> list[Sample]:
        """The samples made for steps after this one: the worker's, once finished."""
        if self.prefetch.worker is not None:
            self.progress.enter("generating", self.step + 1)  # waiting for the worker
        return self.prefetch.pending(self.step, self.sync.resync)

    def _restore(self) -> None:
        folder = latest_checkpoint(self.checkpoints)
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoints}")
        state = read_state(folder)
        pending = state.get("pending", [])
        if len(pending) > self.config.run.max_staleness:
            raise ValueError(
                f"checkpoint {folder} holds {len(pending)} samples prefetched for the next "
                f"steps: resume it with run.max_staleness >= {len(pending)} (it has "
                f"{self.config.run.max_staleness})"
            )
        saved, now = state.get("data_parallel"), self._parallel_layout()
        if saved != now:
            raise ValueError(
                f"checkpoint {folder} holds {_layout_text(saved)}; this trainer runs "
                f"{_layout_text(now)}: resume it the way it was written"
            )
        self.trainer.load_state_dict(state["trainer"])
        self.followers.load(state["step"], state["trainer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.weight_version = int(state.get("weight_version", 0))
        # Their versions are relative to the checkpoint's until the resume's first push.
        self.prefetch.restored = [Sample.from_state(p, self.weight_version) for p in pending]
        self._trained.extend((float(a), float(b)) for a, b in state.get("trained", []))
        self.rewards.scored_through(self.step + len(pending))
        self.metrics.truncate_after(self.step)
        self.log.info("resumed", extra={"step": self.step, "path": str(folder)})


def _layout_text(layout: dict[str, Any] | None) -> str:
    if layout is None:
        return "whole learner state (one process or DDP, any number of ranks)"
    return f"FSDP shards of {layout['world']} ranks"
