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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from rlhf.defaults import DEFAULT_OUTPUT_DIR
from rlhf.logs import ContextLogger
from services.trainer.config import TrainConfig
from services.trainer.orchestrator.checkpoint import latest_checkpoint, save_checkpoint
from services.trainer.orchestrator.data import PromptSampler, load_prompts
from services.trainer.orchestrator.drift import logprob_drift
from services.trainer.orchestrator.metrics import MetricsLog
from services.trainer.orchestrator.model_check import check_served_model, trainer_model_facts
from services.trainer.orchestrator.peers import (
    FatalError,
    PolicyTransport,
    Rollout,
    TransientError,
)
from services.trainer.orchestrator.progress import ProgressTracker
from services.trainer.orchestrator.rewards import RewardMixer, RewardSource
from services.trainer.orchestrator.trainer_state import read_state, write_state
from services.trainer.orchestrator.weight_sync import WeightSync

log = logging.getLogger("rlhf.trainer.loop")
T = TypeVar("T")


@dataclass
class StepResult:
    step: int
    weight_version: int
    stats: dict[str, float]


class StepFailed(RuntimeError):
    """A step could not be completed; it was not counted, logged or checkpointed."""


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


@dataclass
class _Sampled:
    """A step's rollout and its rewards: all of the step that happens outside the learner."""

    rollout: Rollout
    scores: list[float]
    per_source: dict[str, list[float]]


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
        from services.trainer.learner.ppo_trainer import PPOTrainer
        from services.trainer.learner.value_head import PolicyWithValueHead

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
        self.model = PolicyWithValueHead.from_config(ppo)
        self.tokenizer = self.model.tokenizer
        # The reference: the base with LoRA adapters off, or a frozen copy (PPOTrainer decides).
        self.trainer = PPOTrainer(ppo, self.model, self.tokenizer)
        self.sampler = PromptSampler(load_prompts(run.prompts), seed=ppo.seed)
        self.metrics = MetricsLog(self.folder, ppo.log_with)
        self.sync = WeightSync(
            policy,
            self.folder,
            lambda full: self.model.policy_state_dict_for_serving(trained_only=not full),
            self._retrying,
            self.log,
        )

        if resume:
            self._restore()
        # Unless the service serves the base model as loaded (a fresh run's start), make it
        # serve this run's weights before the first Generate.
        self.sync.begin(facts, resumed=resume)

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
            at_boundary = self._mid_step is None
            if at_boundary and self.step > 0:
                if latest_checkpoint(self.checkpoints) != self._step_folder():
                    self.save()
            self.metrics.close()
        return reason

    def run_step(self) -> StepResult:
        """One PPO step. Nothing is counted, logged or checkpointed unless every phase succeeds."""
        if self._mid_step is not None:
            raise StepFailed(
                f"step {self._mid_step} failed after its update changed the learner; the run "
                f"cannot go on: resume it from its last checkpoint"
            )
        step = self.step + 1
        sources = self.rewards.begin_step(step)  # a swap during this step applies from the next
        try:
            return self._run_step(step, sources)
        except FatalError as err:
            raise StepFailed(f"step {step}: {err}") from err
        finally:
            self.rewards.end_step()

    def _run_step(self, step: int, sources: list[RewardSource]) -> StepResult:
        run = self.config.run
        timings: dict[str, float] = {}
        t_step = time.perf_counter()
        sampler_state = self.sampler.state_dict()
        try:
            sampled = self._sample_and_score(step, sources, timings)

            # 3. Old log-probs, values and reference log-probs (the trainer's forward passes).
            queries = [torch.tensor(q, dtype=torch.long) for q in sampled.rollout.query_ids]
            responses = [torch.tensor(r, dtype=torch.long) for r in sampled.rollout.response_ids]
            self.progress.enter("updating", step)
            t = time.perf_counter()
            batch = self.trainer.prepare(
                queries, responses, torch.tensor(sampled.scores, dtype=torch.float32)
            )
            timings["time/ref_values"] = time.perf_counter() - t
            drift = logprob_drift(sampled.rollout.response_logprobs, batch.logprobs, batch.mask)
        except BaseException:
            self.sampler.load_state_dict(sampler_state)  # the same prompts again next time
            raise

        # 4. The PPO update (ppo_epochs over shuffled mini-batches), KL controller update. From
        #    here until the push succeeds the learner is mid-step.
        self._mid_step = step
        t = time.perf_counter()
        stats = self.trainer.update(batch)
        timings["time/update"] = time.perf_counter() - t

        # 5. Weight sync: the next Generate must use the new policy.
        self.progress.enter("syncing", step)
        t = time.perf_counter()
        if step % run.sync_every == 0 or step == run.steps:
            self.sync.push_step(f"step {step}: update weights")
        else:
            self.sync.learner_moved()
        timings["time/weight_sync"] = time.perf_counter() - t
        timings["time/step"] = time.perf_counter() - t_step
        self._mid_step = None
        self.step = step

        # 6. Statistics under the classic names, plus each reward source's mean and the drift.
        stats.update(timings)
        stats.update(drift)
        return self._finish(step, stats, sampled)

    def _sample_and_score(
        self, step: int, sources: list[RewardSource], timings: dict[str, float]
    ) -> _Sampled:
        # 1. Rollout: the policy service samples a response per prompt.
        prompts = self.sampler.next_batch(self.config.ppo.batch_size)
        self.progress.enter("generating", step)
        t = time.perf_counter()
        rollout = self._generate(step, prompts)
        timings["time/generate"] = time.perf_counter() - t

        # 2. Reward: every source scores every (prompt, response); the reward is their
        #    weighted sum. Sources are fixed for the whole step (a swap applies next step).
        self.progress.enter("scoring", step)
        t = time.perf_counter()
        scores, per_source = self._retrying(
            f"step {step}: score",
            lambda: self.rewards.score(prompts, rollout.response_texts, sources),
        )
        timings["time/score"] = time.perf_counter() - t
        return _Sampled(rollout, scores, per_source)

    def _generate(self, step: int, prompts: list[str]) -> Rollout:
        """The step's rollout, sampled from this run's weights: a policy service that restarted
        (or lost them) gets them pushed again and generates again with the same seed, at most
        run.step_retries times a step. Nothing sampled from other weights goes further."""
        gen, seed = self.config.generation, self.config.ppo.seed * 100_003 + step
        retries = self.config.run.step_retries
        for resync in range(retries + 1):
            rollout = self._retrying(
                f"step {step}: generate", lambda: self.policy.generate(prompts, gen, seed=seed)
            )
            if self.sync.serves_ours(rollout):
                return rollout
            if resync == retries:
                break
            self.progress.retried(
                f"the policy service at {self.policy.address} answered from instance "
                f"{rollout.instance_id or '(unnamed)'} at weight version {rollout.weight_version}, "
                f"not this run's version {self.weight_version}: it restarted; pushing the "
                "weights again"
            )
            self.sync.resync(f"step {step}: push weights to a restarted policy", rollout)
        raise StepFailed(
            f"step {step}: the policy service at {self.policy.address} still did not serve this "
            f"run's weights (version {self.weight_version}) after {retries} re-pushes; it "
            f"answered from instance {rollout.instance_id or '(unnamed)'} at version "
            f"{rollout.weight_version}"
        )

    def _finish(self, step: int, stats: dict[str, float], sampled: _Sampled) -> StepResult:
        """The finished step's metrics row and log line."""
        stats["env/reward_mean"], stats["env/reward_std"] = _mean_std(sampled.scores)
        for name, values in sampled.per_source.items():
            stats[f"env/reward/{name}"] = _mean_std(values)[0]
        response_ids = sampled.rollout.response_ids
        stats["env/response_length"] = float(sum(len(r) for r in response_ids) / len(response_ids))
        stats["weight_version"] = float(self.weight_version)
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

    # --- weights, retries, checkpoints -------------------------------------------------------
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
        """Writes a checkpoint atomically: the servable policy, and all state to resume."""

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder / "policy")
            write_state(  # safetensors + JSON: resuming loads no pickle (trainer_state.py)
                folder,
                {
                    "step": self.step,
                    "weight_version": self.weight_version,
                    # model's trainable weights, optimizer, KL controller, RNG states
                    "trainer": self.trainer.state_dict(include_model=True),
                    "sampler": self.sampler.state_dict(),
                    "rewards": [str(s.spec) for s in self.rewards.sources],
                    "config": asdict(self.config),
                },
            )

        self.progress.enter("checkpointing", self.step)
        path = save_checkpoint(self.checkpoints, self.step, write, self.config.run.keep_checkpoints)
        self.log.info("checkpoint written", extra={"step": self.step, "path": str(path)})
        for listener in list(self.checkpointed):
            listener(path)
        return path

    def _restore(self) -> None:
        folder = latest_checkpoint(self.checkpoints)
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoints}")
        state = read_state(folder)
        self.trainer.load_state_dict(state["trainer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.weight_version = int(state.get("weight_version", 0))
        self.metrics.truncate_after(self.step)
        self.log.info("resumed", extra={"step": self.step, "path": str(folder)})
