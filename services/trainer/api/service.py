"""The trainer's control API (TrainerService): start, watch, stop runs; swap reward endpoints.

One run at a time per trainer process, in a background thread. WatchRun replays the run's
finished steps and then follows live ones; SetRewardEndpoints probes the new endpoints before
it swaps, so a bad endpoint never replaces working ones.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from rlhf.errors import RpcError, handle_errors, invalid, precondition
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.config import (
    DEFAULT_POLICY_ADDRESS,
    DEFAULT_REWARD_ADDRESS,
    TrainConfig,
    load_train_config,
)
from services.trainer.orchestrator.loop import StepResult, TrainingLoop
from services.trainer.orchestrator.rewards import EndpointSpec, RewardError, RewardMixer

log = logging.getLogger("rlhf.trainer.service")
State = trainer_pb2.RunState


@dataclass
class TrainerDefaults:
    """What a StartRun that leaves fields empty gets."""

    policy: str = DEFAULT_POLICY_ADDRESS
    rewards: list[str] = field(default_factory=lambda: [DEFAULT_REWARD_ADDRESS])
    output_dir: str = "runs"


class Run:
    """A run's state as the API reports it, updated by the loop's thread."""

    def __init__(self, run_id: str, total_steps: int) -> None:
        self.run_id = run_id
        self.total_steps = total_steps
        self.state = State.RUN_STATE_STARTING
        self.error = ""
        self.history: list[StepResult] = []
        self.loop: TrainingLoop | None = None
        self.rewards: RewardMixer | None = None  # in force once the first endpoints are probed
        self.stop = threading.Event()
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def set_state(self, state: int, error: str = "") -> None:
        with self.changed:
            self.state = state
            self.error = error
            self.changed.notify_all()

    def add_step(self, result: StepResult) -> None:
        with self.changed:
            self.history.append(result)
            self.changed.notify_all()

    @property
    def active(self) -> bool:
        return self.state in (
            State.RUN_STATE_STARTING,
            State.RUN_STATE_RUNNING,
            State.RUN_STATE_STOPPING,
        )

    def status(self) -> trainer_pb2.RunStatus:
        loop = self.loop
        status = trainer_pb2.RunStatus(
            run_id=self.run_id,
            state=self.state,
            step=loop.step if loop else 0,
            total_steps=self.total_steps,
            weight_version=loop.weight_version if loop else 0,
            error=self.error,
        )
        if self.rewards is not None:
            status.rewards.extend(_to_proto(s.spec) for s in self.rewards.sources)
        if loop is not None:
            status.checkpoint_dir = str(loop.checkpoints) if loop.checkpoints.exists() else ""
            status.last_metrics.update(loop.last_stats)
        return status


def _to_proto(spec: EndpointSpec) -> trainer_pb2.RewardEndpoint:
    return trainer_pb2.RewardEndpoint(address=spec.address, weight=spec.weight, name=spec.name)


def _from_proto(endpoint: trainer_pb2.RewardEndpoint) -> EndpointSpec:
    if ":" not in endpoint.address:
        raise invalid(f"reward endpoint address {endpoint.address!r}: expected HOST:PORT")
    return EndpointSpec(endpoint.address, endpoint.weight or 1.0, endpoint.name)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, defaults: TrainerDefaults) -> None:
        self.defaults = defaults
        self.runs: dict[str, Run] = {}
        self.latest: Run | None = None
        self._lock = threading.Lock()

    # --- helpers -----------------------------------------------------------------------------
    def _find(self, run_id: str) -> Run:
        run = self.runs.get(run_id) if run_id else self.latest
        if run is None:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"no run {run_id!r} on this trainer" if run_id else "no run has been started",
            )
        return run

    def _config(self, request: trainer_pb2.StartRunRequest) -> TrainConfig:
        try:
            overrides = [f"{k}={v}" for k, v in request.overrides.items()]
            config = load_train_config(request.config_yaml or None, overrides)
        except (ValueError, TypeError, KeyError) as err:
            raise invalid(f"bad run config: {err}") from None
        run = config.run
        run.policy = request.policy_address or run.policy or self.defaults.policy
        if request.rewards:
            run.rewards = [str(_from_proto(r)) for r in request.rewards]
        elif not run.rewards:
            run.rewards = list(self.defaults.rewards)
        if not run.rewards:
            raise invalid("no reward endpoints: set run.rewards or start the trainer with --reward")
        run.run_id = request.run_id or run.run_id or time.strftime("run-%Y%m%d-%H%M%S")
        run.output_dir = run.output_dir or self.defaults.output_dir
        return config

    # --- RPCs --------------------------------------------------------------------------------
    @handle_errors
    def StartRun(
        self, request: trainer_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunStatus:
        config = self._config(request)
        with self._lock:
            if self.latest is not None and self.latest.active:
                raise precondition(f"run {self.latest.run_id} is still active; StopRun it first")
            run = Run(config.run.run_id, config.run.steps)
            self.runs[run.run_id] = run
            self.latest = run
        run.thread = threading.Thread(
            target=self._run, args=(run, config, request.resume), name=f"run-{run.run_id}"
        )
        run.thread.start()
        return run.status()

    def _run(self, run: Run, config: TrainConfig, resume: bool) -> None:
        from services.trainer.orchestrator.transports import GrpcPolicy, GrpcReward

        mixer = RewardMixer(GrpcReward)
        policy = GrpcPolicy(config.run.policy)
        try:
            mixer.set_endpoints([EndpointSpec.parse(r) for r in config.run.rewards])
            run.rewards = mixer  # swappable from here on, also while the models load
            run.loop = TrainingLoop(config, policy, mixer, resume=resume)
            run.set_state(State.RUN_STATE_RUNNING)
            reason = run.loop.run(stop=run.stop, on_step=run.add_step)
            run.set_state(
                State.RUN_STATE_COMPLETED if reason == "completed" else State.RUN_STATE_STOPPED
            )
        except Exception as err:  # noqa: BLE001 - the run fails, the service stays up
            log.error("run failed", extra={"run": run.run_id, "error": traceback.format_exc()})
            run.set_state(State.RUN_STATE_FAILED, f"{type(err).__name__}: {err}")
        finally:
            mixer.close()
            policy.close()

    @handle_errors
    def GetRun(
        self, request: trainer_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunStatus:
        return self._find(request.run_id).status()

    def WatchRun(
        self, request: trainer_pb2.WatchRunRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.StepMetrics]:
        try:
            run = self._find(request.run_id)
        except RpcError as err:
            context.abort(err.code, err.message)
        next_index = max(0, request.from_step - 1) if request.from_step else len(run.history)
        while context.is_active():
            with run.changed:
                while next_index >= len(run.history) and run.active and context.is_active():
                    run.changed.wait(timeout=1.0)
                pending = run.history[next_index:]
                state, active = run.state, run.active
            for result in pending:
                yield trainer_pb2.StepMetrics(
                    run_id=run.run_id,
                    step=result.step,
                    weight_version=result.weight_version,
                    metrics=result.stats,
                    timestamp=time.time(),
                    state=state,
                )
            next_index += len(pending)
            if not active and next_index >= len(run.history):
                return

    @handle_errors
    def StopRun(
        self, request: trainer_pb2.StopRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunStatus:
        run = self._find(request.run_id)
        if run.active:
            run.set_state(State.RUN_STATE_STOPPING)
            run.stop.set()
            if run.thread is not None:
                run.thread.join()  # the step in progress finishes, then the checkpoint
        return run.status()

    @handle_errors
    def SetRewardEndpoints(
        self, request: trainer_pb2.SetRewardEndpointsRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.SetRewardEndpointsResponse:
        run = self._find(request.run_id)
        if not request.rewards:
            raise invalid("SetRewardEndpoints needs at least one reward endpoint")
        mixer = run.rewards
        if not run.active or mixer is None:
            raise precondition(
                f"run {run.run_id} takes no swap in state {State.Name(run.state)}"
                + (" (its first reward endpoints are still being probed)" if run.active else "")
            )
        specs = [_from_proto(r) for r in request.rewards]
        try:
            applied, in_step = mixer.set_endpoints(specs)
        except RewardError as err:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"swap refused: {err}") from None
        # The first step that snapshots the new sources: the one after the step in progress
        # (the loop counts a step as done before its weight sync ends, so its counter alone
        # would be off by one there), else the next one to start.
        if in_step is not None:
            effective = in_step + 1
        else:
            effective = (run.loop.step if run.loop is not None else 0) + 1
        log.info(
            "reward endpoints swapped",
            extra={"run": run.run_id, "rewards": [str(s) for s in applied], "from_step": effective},
        )
        return trainer_pb2.SetRewardEndpointsResponse(
            rewards=[_to_proto(s) for s in applied], effective_from_step=effective
        )
