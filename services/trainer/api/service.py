"""The trainer's control API (TrainerService): start, watch, stop runs; swap reward endpoints.

One run at a time per trainer process, in a background thread. WatchRun replays the run's
finished steps, follows live steps and phase changes, and ends with the run's terminal state;
StopRun only asks (the run finishes its step and checkpoints on its own thread), so no call
holds a worker thread for a step. SetRewardEndpoints probes the new endpoints before it swaps,
so a bad endpoint never replaces working ones.

Runs outlive the process: each keeps `<output root>/<run_id>/run.json` (records.py), and a
trainer that starts lists the runs it finds there (one that was active is INTERRUPTED), resumes
them through StartRun(resume=True) with their saved config, and with --resume-interrupted
resumes the most recent interrupted one by itself.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from rlhf.call_limits import CallLimits
from rlhf.config import apply_mapping, apply_overrides, check
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
from services.trainer.api.records import Checkpointed, read_checkpointed, scan
from services.trainer.api.runs import Run, State, endpoint_to_proto, watch
from services.trainer.config import (
    MAX_CONFIG_BYTES,
    TrainConfig,
    TrainerServiceConfig,
    load_train_config,
)
from services.trainer.orchestrator.loop import TrainingLoop
from services.trainer.orchestrator.model_check import ModelMismatch
from services.trainer.orchestrator.peers import PolicyTransport, TransientError
from services.trainer.orchestrator.resume import Swap, apply_plan, plan_rewards
from services.trainer.orchestrator.rewards import (
    EndpointSpec,
    RewardError,
    RewardMixer,
    RewardTransport,
)
from services.trainer.orchestrator.trainer_state import read_summary
from services.trainer.orchestrator.transports import served_model_check

log = logging.getLogger("rlhf.trainer.service")
RESUME_RETRY_S = 5.0
"""Pause between attempts of resume_interrupted's resume while a reward endpoint is down."""


def _from_proto(endpoint: trainer_pb2.RewardEndpoint) -> EndpointSpec:
    try:  # the spec refuses a malformed address, a non-finite weight, an odd name
        return EndpointSpec(endpoint.address, endpoint.weight or 1.0, endpoint.name)
    except ValueError as err:
        raise invalid(str(err)) from None


@dataclass
class Transports:
    """How a run reaches its policy and reward services, each made from its address (a reward
    source's: its ADDRESSES, transports.connect_reward)."""

    policy: Callable[[str, CallLimits], PolicyTransport]
    """Made from run.policy (a HOST:PORT, a list of replicas or dns:///HOST:PORT)."""
    reward: Callable[[str, CallLimits], RewardTransport]
    """Each made from its address and the run's CallLimits (its deadlines and health watch)."""

    @classmethod
    def grpc(cls) -> Transports:
        from services.trainer.orchestrator.transports import connect_policy, connect_reward

        return cls(
            policy=lambda spec, limits: connect_policy(spec, limits=limits),
            reward=lambda address, limits: connect_reward(address, limits=limits),
        )


def saved_config(data: dict[str, Any], overrides: list[str]) -> TrainConfig:
    """A run's config from its run.json (dataclasses.asdict form), then `overrides`. Its reward
    endpoints are left empty: a resume takes its checkpoint's unless the overrides name some."""
    config = TrainConfig()
    apply_mapping(config, data)
    config.run.rewards = []
    config.run.output_dir = ""  # the run's folder is under this trainer's root: its root
    apply_overrides(config, overrides)
    check(config, "run config")
    return config


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self, defaults: TrainerServiceConfig, transports: Transports | None = None
    ) -> None:
        """`transports`: gRPC unless given (tests run runs with in-process ones). Lists the
        runs recorded under the output root; with resume_interrupted, resumes the latest
        INTERRUPTED one."""
        self.defaults = defaults
        self.rules = InputRules(defaults)
        self.transports = transports or Transports.grpc()
        self.runs: dict[str, Run] = {}
        self.latest: Run | None = None
        self._lock = threading.Lock()
        self._load_runs()
        if defaults.resume_interrupted:
            self.resume_interrupted()

    def _load_runs(self) -> None:
        """The runs of an earlier trainer process, from their run.json and checkpoints."""
        root = self.rules.output_root
        for record, saved in scan(root):
            self.runs[record.run_id] = Run.found(record, saved, root / record.run_id)
        if self.runs:
            self.latest = max(self.runs.values(), key=lambda r: r.updated)
            states = {r.run_id: State.Name(r.state) for r in self.runs.values()}
            log.info("runs found", extra={"output_dir": str(root), "runs": states})

    def resume_interrupted(self) -> None:
        """Resumes the most recent INTERRUPTED run (one run at a time: the others stay
        INTERRUPTED). Refused because a reward endpoint does not answer yet, it is tried again
        in the background every RESUME_RETRY_S for resume_wait_s; any other refusal is logged
        and the run stays INTERRUPTED."""
        interrupted = [r for r in self.runs.values() if r.state == State.RUN_STATE_INTERRUPTED]
        if not interrupted:
            return
        run_id = max(interrupted, key=lambda r: r.updated).run_id
        if not self._try_resume(run_id):
            threading.Thread(
                target=self._keep_resuming, args=(run_id,), name=f"resume-{run_id}", daemon=True
            ).start()

    def _try_resume(self, run_id: str) -> bool:
        """One resume attempt of an INTERRUPTED run; False when it is worth another later."""
        try:
            run = self._start(trainer_pb2.StartRunRequest(run_id=run_id, resume=True))
        except RpcError as err:
            if err.code == grpc.StatusCode.UNAVAILABLE:
                log.warning(
                    "interrupted run not resumed yet; trying again",
                    extra={"run": run_id, "error": str(err), "retry_s": RESUME_RETRY_S},
                )
                return False
            log.error("interrupted run not resumed", extra={"run": run_id, "error": str(err)})
            return True
        log.info("interrupted run resumed", extra={"run": run_id, "from_step": run.step})
        return True

    def _keep_resuming(self, run_id: str) -> None:
        deadline = time.monotonic() + self.defaults.resume_wait_s
        while time.monotonic() + RESUME_RETRY_S <= deadline:
            time.sleep(RESUME_RETRY_S)
            run = self.runs.get(run_id)
            if run is None or run.state != State.RUN_STATE_INTERRUPTED:
                return  # a caller resumed it (or started it afresh) meanwhile
            if self._try_resume(run_id):
                return
        log.error(
            "interrupted run not resumed: its reward endpoints did not answer in time",
            extra={"run": run_id, "resume_wait_s": self.defaults.resume_wait_s},
        )

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

    def _config(
        self, request: trainer_pb2.StartRunRequest, known: Run | None
    ) -> tuple[TrainConfig, list[str]]:
        """The run's config from the request, every name checked against the trainer's rules
        (services/trainer/api/inputs.py); the YAML is text only, never a path. A resume of a
        `known` run without config_yaml starts from its saved config. Also returns the reward
        endpoints the caller named (StartRun.rewards, run.rewards), empty when none."""
        if request.run_id:
            check_run_id(request.run_id)
        check_config_size(request.config_yaml, dict(request.overrides))
        overrides = [f"{k}={v}" for k, v in request.overrides.items()]
        try:
            if request.resume and not request.config_yaml and known and known.config:
                config = saved_config(known.config, overrides)
            else:
                config = load_train_config(request.config_yaml or None, overrides, MAX_CONFIG_BYTES)
        except (ValueError, TypeError, KeyError) as err:
            raise invalid(f"bad run config: {err}") from None
        run = config.run
        run.policy = request.policy_address or run.policy or self.defaults.policy
        if request.rewards:
            run.rewards = [str(_from_proto(r)) for r in request.rewards]
        caller = list(run.rewards)
        if not run.rewards:
            run.rewards = list(self.defaults.reward)
        if not run.rewards:
            raise invalid("no reward endpoints: set run.rewards or start the trainer with --reward")
        run.run_id = request.run_id or run.run_id or time.strftime("run-%Y%m%d-%H%M%S")
        apply_rules(self.rules, config)
        return config, caller

    def _resume(
        self, config: TrainConfig, caller: list[str], known: Run | None
    ) -> tuple[Checkpointed, list[Swap], RewardMixer]:
        """A resume's checkpoint, swaps journal and reward mixer (every endpoint probed):
        the endpoints in force at the checkpoint and the swaps made after it, unless the
        caller named endpoints. FAILED_PRECONDITION when the run cannot be resumed."""
        run_id = config.run.run_id
        check_resumable(config)
        try:
            saved = read_checkpointed(self.rules.run_folder(run_id))
        except (OSError, ValueError) as err:
            raise precondition(f"resume of run {run_id}: {err}") from None
        if known is not None and known.state == State.RUN_STATE_COMPLETED:
            if config.run.steps <= saved.step:
                raise precondition(
                    f"run {run_id} COMPLETED at step {saved.step}; resume it with more steps "
                    f"(override run.steps, above {saved.step})"
                )
        journal = known.swaps if known is not None else []
        try:
            plan = plan_rewards(run_id, saved.step, saved.rewards, caller, journal)
        except ValueError as err:
            raise precondition(str(err)) from None
        for step, specs in [(0, plan.initial)] + [(s.from_step, s.rewards) for s in plan.swaps]:
            where = "reward endpoints" if not step else f"swap from step {step}"
            self.rules.rewards([EndpointSpec.parse(r) for r in specs], where)
        config.run.rewards = list(plan.initial)
        mixer = self._mixer(config)
        try:
            apply_plan(mixer, plan)
        except RewardError as err:
            mixer.close()
            # An endpoint that does not answer yet may later (UNAVAILABLE: try again); one that
            # answers wrongly will not.
            unreachable = isinstance(err.__cause__, TransientError)
            code = (
                grpc.StatusCode.UNAVAILABLE if unreachable else grpc.StatusCode.FAILED_PRECONDITION
            )
            raise RpcError(code, f"resume of run {run_id}: {err}") from None
        if saved.checkpoint_dir:  # samples prefetched (run.max_staleness >= 1) are scored
            try:
                mixer.scored_through(read_summary(Path(saved.checkpoint_dir))["scored_through"])
            except (OSError, ValueError) as err:
                mixer.close()
                raise precondition(f"resume of run {run_id}: {err}") from None
        if plan.caller_wins:  # the swaps after the checkpoint are not re-applied: forget them
            journal = [s for s in journal if s.from_step <= saved.step]
        return saved, list(journal), mixer

    # --- RPCs --------------------------------------------------------------------------------
    @handle_errors
    def StartRun(
        self, request: trainer_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunStatus:
        return self._start(request).status()

    def _start(self, request: trainer_pb2.StartRunRequest) -> Run:
        """StartRun's work: checks, then the run's thread. Raises RpcError."""
        known = self.runs.get(request.run_id) if request.resume else None
        if known is not None and known.active:  # said before its endpoints are probed
            raise precondition(f"run {known.run_id} is still active: it cannot be resumed")
        config, caller = self._config(request, known)
        saved, journal, mixer = Checkpointed(), [], None
        if request.resume:
            saved, journal, mixer = self._resume(config, caller, known)
        try:
            try:  # the model check before the run starts (the run's TrainingLoop checks again)
                served_model_check(config.run.policy, config.ppo.model_name)
            except ModelMismatch as err:
                raise precondition(str(err)) from None
            with self._lock:
                if self.latest is not None and self.latest.active:
                    state = State.Name(self.latest.state).removeprefix("RUN_STATE_")
                    raise precondition(
                        f"run {self.latest.run_id} is still {state}; StopRun it and wait for it "
                        "to end (WatchRun's END message) first"
                    )
                folder = self.rules.run_folder(config.run.run_id)
                run = Run(config.run.run_id, config.run.steps, saved, folder)
                run.policy, run.config, run.swaps = config.run.policy, asdict(config), journal
                self.runs[run.run_id] = run  # a resumed run's new Run replaces the old one
                self.latest = run
        except BaseException:
            if mixer is not None:
                mixer.close()
            raise
        run.save_record()
        run.thread = threading.Thread(
            target=self._run, args=(run, config, request.resume, mixer), name=f"run-{run.run_id}"
        )
        run.thread.start()
        return run

    def _mixer(self, config: TrainConfig) -> RewardMixer:
        """A reward mixer whose transports call with the run's deadlines and health watch."""
        limits = config.run.call_limits()
        return RewardMixer(lambda address: self.transports.reward(address, limits))

    def _run(self, run: Run, config: TrainConfig, resume: bool, mixer: RewardMixer | None) -> None:
        """The run's thread. `mixer`: a resume's, its endpoints probed; None: probed here."""
        state, error = State.RUN_STATE_FAILED, ""
        fresh = mixer is None
        mixer = mixer or self._mixer(config)
        policy: PolicyTransport | None = None
        try:  # a policy address its TLS settings cannot reach fails the run, as a refusal does
            policy = self.transports.policy(config.run.policy, config.run.call_limits())
            if fresh:
                mixer.set_endpoints([EndpointSpec.parse(r) for r in config.run.rewards])
            run.rewards = mixer  # swappable from here on, also while the models load
            loop = TrainingLoop(config, policy, mixer, resume, run.progress_tracker)
            run.attach(loop)
            reason = loop.run(stop=run.stop, on_step=run.add_step)
            state = State.RUN_STATE_COMPLETED if reason == "completed" else State.RUN_STATE_STOPPED
        except Exception as err:  # noqa: BLE001 - the run fails, the service stays up
            log.error("run failed", extra={"run": run.run_id, "error": traceback.format_exc()})
            error = f"{type(err).__name__}: {err}"
        finally:
            run.retire_rewards()  # GetRun keeps listing the endpoints of an ended run
            run.release_loop()
            mixer.close()
            if policy is not None:
                policy.close()
        run.set_state(state, error)

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
                + (" (its endpoints are being probed, or it is ending)" if run.active else "")
            )
        try:
            # The mixer names the first step whose scoring had not begun: with prefetching
            # (run.max_staleness >= 1) a step or two past the one the learner trains.
            applied, effective = mixer.swap(specs)
        except RewardError as err:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"swap refused: {err}") from None
        run.record_swap(effective, applied)  # a resume re-applies it from its step
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
