"""The trainer's control API (TrainerService): start, watch, stop runs; swap reward endpoints.

One run at a time per trainer process, in a background thread. WatchRun replays the run's
finished steps, follows live steps and phase changes, and ends with the run's terminal state;
StopRun only asks (the run finishes its step and checkpoints on its own thread), so no call
holds a worker thread for a step. SetRewardEndpoints probes the new endpoints before it swaps,
so a bad endpoint never replaces working ones.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from rlhf.call_limits import CallLimits
from rlhf.errors import RpcError, handle_errors, invalid, precondition
from rlhf.handlers import CONTROL, add_service
from rlhf.logs import quote
from rlhf.protocol import TRAINER_DESCRIPTOR, TRAINER_SERVICE
from rlhf.server import Registration
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.api.inputs import (
    InputRules,
    apply_rules,
    check_config_size,
    check_resumable,
    check_run_id,
)
from services.trainer.api.runs import Run, State, endpoint_to_proto, watch
from services.trainer.config import (
    MAX_CONFIG_BYTES,
    TrainConfig,
    TrainerServiceConfig,
    load_train_config,
)
from services.trainer.orchestrator.loop import TrainingLoop
from services.trainer.orchestrator.model_check import ModelMismatch
from services.trainer.orchestrator.peers import PolicyTransport
from services.trainer.orchestrator.rewards import (
    EndpointSpec,
    RewardError,
    RewardMixer,
    RewardTransport,
)
from services.trainer.orchestrator.transports import served_model_check

log = logging.getLogger("rlhf.trainer.service")


def _from_proto(endpoint: trainer_pb2.RewardEndpoint) -> EndpointSpec:
    try:  # the spec refuses a malformed address, a non-finite weight, an odd name
        return EndpointSpec(endpoint.address, endpoint.weight or 1.0, endpoint.name)
    except ValueError as err:
        raise invalid(str(err)) from None


@dataclass
class Transports:
    """How a run reaches its policy and reward services, each made from a host:port."""

    policy: Callable[[str, CallLimits], PolicyTransport]
    reward: Callable[[str, CallLimits], RewardTransport]
    """Each made from a host:port and the run's CallLimits (its deadlines and health watch)."""

    @classmethod
    def grpc(cls) -> Transports:
        from services.trainer.orchestrator.transports import GrpcPolicy, GrpcReward

        return cls(
            policy=lambda address, limits: GrpcPolicy(address, limits=limits),
            reward=lambda address, limits: GrpcReward(address, limits=limits),
        )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self, defaults: TrainerServiceConfig, transports: Transports | None = None
    ) -> None:
        """`transports`: gRPC unless given (tests run runs with in-process ones)."""
        self.defaults = defaults
        self.rules = InputRules(defaults)
        self.transports = transports or Transports.grpc()
        self.runs: dict[str, Run] = {}
        self.latest: Run | None = None
        self._lock = threading.Lock()

    # --- helpers -----------------------------------------------------------------------------
    def _find(self, run_id: str, rpc: str = "") -> Run:
        """The run named `run_id`; empty: the latest, for the read-only RPCs. Calls that change
        a run (`rpc` names them) must name it: "the latest" may not be the caller's."""
        if not run_id and rpc:
            raise invalid(
                f"{rpc} needs a run_id: the run to change (GetRun with an empty run_id names "
                "the latest run)"
            )
        if run_id:
            check_run_id(run_id)
        run = self.runs.get(run_id) if run_id else self.latest
        if run is None:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"no run {quote(run_id)} on this trainer" if run_id else "no run has been started",
            )
        return run

    def _config(self, request: trainer_pb2.StartRunRequest) -> TrainConfig:
        """The run's config from the request, every name checked against the trainer's rules
        (services/trainer/api/inputs.py); the YAML is text only, never a path."""
        if request.run_id:
            check_run_id(request.run_id)
        check_config_size(request.config_yaml, dict(request.overrides))
        try:
            overrides = [f"{k}={v}" for k, v in request.overrides.items()]
            config = load_train_config(request.config_yaml or None, overrides, MAX_CONFIG_BYTES)
        except (ValueError, TypeError, KeyError) as err:
            raise invalid(f"bad run config: {err}") from None
        run = config.run
        run.policy = request.policy_address or run.policy or self.defaults.policy
        if request.rewards:
            run.rewards = [str(_from_proto(r)) for r in request.rewards]
        elif not run.rewards:
            run.rewards = list(self.defaults.reward)
        if not run.rewards:
            raise invalid("no reward endpoints: set run.rewards or start the trainer with --reward")
        run.run_id = request.run_id or run.run_id or time.strftime("run-%Y%m%d-%H%M%S")
        apply_rules(self.rules, config)
        return config

    # --- RPCs --------------------------------------------------------------------------------
    @handle_errors
    def StartRun(
        self, request: trainer_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunStatus:
        config = self._config(request)
        if request.resume:
            check_resumable(config)
        try:  # the model check before the run starts (the run's TrainingLoop checks again)
            served_model_check(config.run.policy, config.ppo.model_name)
        except ModelMismatch as err:
            raise precondition(str(err)) from None
        with self._lock:
            if self.latest is not None and self.latest.active:
                state = State.Name(self.latest.state).removeprefix("RUN_STATE_")
                raise precondition(
                    f"run {self.latest.run_id} is still {state}; StopRun it and wait for it to "
                    "end (WatchRun's END message) first"
                )
            run = Run(config.run.run_id, config.run.steps)
            self.runs[run.run_id] = run
            self.latest = run
        run.thread = threading.Thread(
            target=self._run, args=(run, config, request.resume), name=f"run-{run.run_id}"
        )
        run.thread.start()
        return run.status()

    def _run(self, run: Run, config: TrainConfig, resume: bool) -> None:
        limits = config.run.call_limits()
        mixer = RewardMixer(lambda address: self.transports.reward(address, limits))
        policy: PolicyTransport | None = None
        try:  # a policy address its TLS settings cannot reach fails the run, as a refusal does
            policy = self.transports.policy(config.run.policy, limits)
            mixer.set_endpoints([EndpointSpec.parse(r) for r in config.run.rewards])
            run.rewards = mixer  # swappable from here on, also while the models load
            loop = TrainingLoop(config, policy, mixer, resume=resume)
            run.attach(loop)
            reason = loop.run(stop=run.stop, on_step=run.add_step)
            run.set_state(
                State.RUN_STATE_COMPLETED if reason == "completed" else State.RUN_STATE_STOPPED
            )
        except Exception as err:  # noqa: BLE001 - the run fails, the service stays up
            log.error("run failed", extra={"run": run.run_id, "error": traceback.format_exc()})
            run.set_state(State.RUN_STATE_FAILED, f"{type(err).__name__}: {err}")
        finally:
            mixer.close()
            if policy is not None:
                policy.close()

    @handle_errors
    def GetRun(
        self, request: trainer_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunStatus:
        return self._find(request.run_id).status()

    def WatchRun(
        self, request: trainer_pb2.WatchRunRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.StepMetrics]:
        """A generator: its RpcErrors become statuses in rlhf.handlers (no decorator can)."""
        run = self._find(request.run_id)
        gone = threading.Event()

        def client_gone() -> None:  # the call ended: cancelled, or the server is stopping
            with run.changed:
                gone.set()
                run.changed.notify_all()

        context.add_callback(client_gone)
        yield from watch(run, request.from_step, gone)

    @handle_errors
    def StopRun(
        self, request: trainer_pb2.StopRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunStatus:
        run = self._find(request.run_id, "StopRun")
        run.request_stop()  # the loop finishes its step and checkpoints; WatchRun tells when
        return run.status()

    @handle_errors
    def SetRewardEndpoints(
        self, request: trainer_pb2.SetRewardEndpointsRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.SetRewardEndpointsResponse:
        run = self._find(request.run_id, "SetRewardEndpoints")
        if not request.rewards:
            raise invalid("SetRewardEndpoints needs at least one reward endpoint")
        specs = self.rules.rewards([_from_proto(r) for r in request.rewards], "rewards")
        mixer = run.rewards
        if not run.active or mixer is None:
            raise precondition(
                f"run {run.run_id} takes no swap in state {State.Name(run.state)}"
                + (" (its first reward endpoints are still being probed)" if run.active else "")
            )
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
            rewards=[endpoint_to_proto(s) for s in applied], effective_from_step=effective
        )


def add_trainer_service(servicer: TrainerServicer, server: grpc.Server) -> None:
    """Registers the servicer with rlhf.handlers' self-decoding handlers: every method is a
    control call, capped at CONTROL_REQUEST_BYTES (a run config is a few KB)."""
    limits = dict.fromkeys(TRAINER_DESCRIPTOR.methods_by_name, CONTROL)
    add_service(TRAINER_DESCRIPTOR, servicer, server, limits)


def servicers(servicer: TrainerServicer) -> list[Registration]:
    """What `rlhf trainer serve` (and tests) put on a server: the TrainerService."""
    return [Registration(add_trainer_service, servicer, TRAINER_SERVICE)]
