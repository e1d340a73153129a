"""The commands a user drives runs with: `rlhf train`, `status`, `watch`, `stop`, `swap-reward`.

Clients of the trainer's control API (TrainerService). Import-light (no torch here): the heavy
imports happen inside `run`. Failures reach the user as `CommandError` (TrainerClient raises
`TrainerError`, one of them): the `rlhf` entry point prints its one line.

Every command takes the client TLS flags (--tls-cert, --tls-key, --tls-ca, --tls-server-name,
--allow-plaintext) and --token-file, generated from ClientConfig (RLHF_* variables too); `rlhf
train` without --trainer uses them for its channels to the policy and reward services.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rlhf.command_errors import CommandError
from rlhf.config import add_dataclass_arguments, add_env_argument, from_args
from rlhf.config.security import ClientConfig
from rlhf.defaults import DEFAULT_OUTPUT_DIR, POLICY_ADDRESS, REWARD_ADDRESS, TRAINER_ADDRESS
from services.trainer.api.watching import RECONNECT_S, resume_hint, state_name, watch_run
from services.trainer.config import DATA_PARALLEL, DIST_BACKENDS

if TYPE_CHECKING:  # annotations only: the modules themselves are imported where they run
    from services.trainer.api.client import TrainerClient
    from services.trainer.config import TrainConfig
    from services.trainer.orchestrator.loop import TrainingLoop
    from services.trainer.orchestrator.resume import RewardPlan


def _add_trainer_address(parser: argparse.ArgumentParser) -> None:
    add_env_argument(
        parser, "--trainer", default=TRAINER_ADDRESS, help="host:port of the trainer service"
    )
    add_dataclass_arguments(parser, ClientConfig)


def _add_run_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default="", help="the run (default: the latest)")


def _client(args: argparse.Namespace) -> TrainerClient:
    from services.trainer.api.client import TrainerClient

    return TrainerClient(args.trainer, client=from_args(ClientConfig, args))


# --- rlhf train ----------------------------------------------------------------------------------
class Train:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Run PPO: start a run on a trainer service and follow it (--trainer), or run the "
            "loop in this process against the policy and reward services."
        )
        parser.add_argument(
            "--config", default="", help="run config YAML (default: the built-in defaults)"
        )
        parser.add_argument(
            "--trainer",
            default="",
            help="start the run on this trainer service (host:port) and watch it "
            "(default: run the loop in this process against --policy and --reward)",
        )
        parser.add_argument(
            "--policy",
            default="",
            help=f"PolicyService HOST:PORT, replicas HOST:PORT,HOST:PORT,... or dns:///HOST:PORT "
            f"(default: run.policy, else the trainer's --policy; in this process "
            f"{POLICY_ADDRESS})",
        )
        parser.add_argument(
            "--reward",
            action="append",
            default=[],
            metavar="[NAME@]ADDRESSES[=WEIGHT]",
            help=f"a reward source (HOST:PORT, replicas HOST:PORT+HOST:PORT, or "
            f"dns:///HOST:PORT), repeat for a weighted sum (default: run.rewards, else the "
            f"trainer's --reward; in this process {REWARD_ADDRESS})",
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set learning_rate=1e-4 --set run.steps=5",
        )
        parser.add_argument(
            "--run-id", default="", help="run name and checkpoint folder (default: the time)"
        )
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue from its checkpoint, with the reward endpoints in force there "
            "(unless --reward names others)",
        )
        parser.add_argument(
            "--detach", action="store_true", help="start on the trainer, don't watch"
        )
        parser.add_argument(
            "--data-parallel",
            choices=DATA_PARALLEL,
            default="ddp",
            help="under torchrun, in this process: ddp (replicas) or fsdp (shards) of the learner",
        )
        parser.add_argument(
            "--dist-backend",
            choices=DIST_BACKENDS,
            default="auto",
            help="under torchrun: gloo, nccl or auto (nccl when CUDA is available)",
        )
        add_dataclass_arguments(parser, ClientConfig)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        overrides = list(args.set)
        if args.policy:
            overrides.append(f"run.policy={args.policy}")
        if args.reward:
            overrides.append("run.rewards=" + ",".join(args.reward))
        if args.run_id:
            overrides.append(f"run.run_id={args.run_id}")
        if args.trainer:
            return _train_on_service(args, overrides)
        return _train_here(args, overrides)


def _require_serving(what: str, address: str, flags: str, client: ClientConfig) -> None:
    """Fails at once, in one line, when no service answers at `address` (before any model
    loads)."""
    import grpc

    from rlhf.channels import check_health, open_channel

    try:
        channel = open_channel(address, client)
    except ValueError as err:  # TLS or token files that cannot work, named with their flag
        raise CommandError(str(err)) from None
    with channel:
        try:
            check_health(channel, timeout_s=5.0)
        except grpc.RpcError as err:
            raise CommandError(
                f"no {what} service answers at {address} ({err.code().name}): is "
                f"`rlhf {what} serve` running there? ({flags})"
            ) from err


def _train_here(args: argparse.Namespace, overrides: list[str]) -> int:
    """The run in this process; under torchrun, rank 0 runs it and the other ranks follow."""
    from rlhf.logs import setup_logging
    from services.trainer.learner import parallel

    setup_logging("trainer")
    dp = parallel.init_from_env(args.data_parallel, args.dist_backend)
    if dp is not None and not dp.leader:
        from services.trainer.orchestrator.learner_group import follow

        follow(dp)
        return 0
    try:
        return _run_here(args, overrides)
    finally:
        if dp is not None:
            from services.trainer.orchestrator.learner_group import Followers

            Followers(dp).shutdown()


def _run_here(args: argparse.Namespace, overrides: list[str]) -> int:
    from services.trainer.config import load_train_config
    from services.trainer.orchestrator.loop import StepFailed, TrainingLoop
    from services.trainer.orchestrator.peers import PeerError
    from services.trainer.orchestrator.policy_endpoints import PolicyEndpoints
    from services.trainer.orchestrator.resume import apply_plan
    from services.trainer.orchestrator.rewards import EndpointSpec, RewardError, RewardMixer
    from services.trainer.orchestrator.transports import (
        connect_policy,
        connect_reward,
        connect_rewards,
    )

    text = _read_config(args.config)  # a missing file is one line, not a traceback
    try:
        config = load_train_config(text or None, overrides)
    except (ValueError, TypeError, KeyError) as err:
        raise CommandError(f"bad run config: {err}") from err
    caller = list(config.run.rewards)
    config.run.policy = config.run.policy or POLICY_ADDRESS
    config.run.rewards = caller or [REWARD_ADDRESS]
    config.run.output_dir = config.run.output_dir or DEFAULT_OUTPUT_DIR
    plan = _resume_plan(config, caller) if args.resume else None
    if plan is not None:
        config.run.rewards = plan.initial
    every = config.run.rewards + [r for s in (plan.swaps if plan else []) for r in s.rewards]
    client = from_args(ClientConfig, args)
    try:
        endpoints = PolicyEndpoints.parse(config.run.policy)
    except ValueError as err:
        raise CommandError(f"--policy / run.policy: {err}") from None
    for address in endpoints.allowed:  # every replica listed (a typo is caught before loading)
        _require_serving("policy", address, "--policy / run.policy", client)
    for address in dict.fromkeys(a for r in every for a in EndpointSpec.parse(r).addresses):
        _require_serving("reward", address, "--reward / run.rewards", client)
    limits = config.run.call_limits()
    try:  # a peer that fails the run is one line naming it, not a traceback
        if plan is None:
            mixer = connect_rewards(
                [EndpointSpec.parse(r) for r in config.run.rewards], client, limits
            )
        else:
            mixer = RewardMixer(lambda address: connect_reward(address, client, limits))
            try:
                apply_plan(mixer, plan)
            except RewardError as err:
                mixer.close()
                raise CommandError(f"--resume of run {config.run.run_id}: {err}") from None
        try:
            policy = connect_policy(config.run.policy, client, limits)
            try:
                loop = TrainingLoop(config, policy, mixer, resume=args.resume)
                _run_with_display(loop)
            finally:
                policy.close()
        finally:
            mixer.close()
    except (PeerError, StepFailed) as err:
        raise CommandError(str(err)) from None
    print(f"run {config.run.run_id}: {loop.step} steps; metrics in {loop.metrics.path}")
    return 0


def _run_with_display(loop: TrainingLoop) -> None:
    from services.trainer.api.display import ProgressDisplay

    display = ProgressDisplay(loop.config.run.steps, initial=loop.step)
    loop.progress.listeners.append(
        lambda p: display.phase(
            p.phase, p.step, _since(p.since), p.retries, last_error=p.last_error
        )
    )
    try:
        loop.run(on_step=lambda r: display.step(r.step, r.stats))
    finally:
        display.close()


def _resume_plan(config: TrainConfig, caller: list[str]) -> RewardPlan:
    """`--resume`: the checkpoint's reward endpoints and the swaps journaled after it (run.json
    of a run a trainer service ran), unless the caller named endpoints (those win, logged)."""
    from pathlib import Path

    from services.trainer.api.records import RECORD, read_checkpointed, read_record
    from services.trainer.orchestrator.resume import plan_rewards

    folder = Path(config.run.output_dir) / config.run.run_id
    try:
        saved = read_checkpointed(folder)
        journal = read_record(folder).swaps if (folder / RECORD).is_file() else []
        if not saved.checkpoint_dir:
            raise ValueError(f"no checkpoint under {folder / 'checkpoints'}")
        return plan_rewards(config.run.run_id, saved.step, saved.rewards, caller, journal)
    except (OSError, ValueError) as err:
        raise CommandError(f"--resume of run {config.run.run_id}: {err}") from None


def _since(unix_time: float) -> float:
    import time

    return max(0.0, time.time() - unix_time)


def _read_config(path: str) -> str:
    """The YAML text of --config ("" without one)."""
    from pathlib import Path

    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as err:
        raise CommandError(f"--config {path}: {err.strerror}") from err


def _train_on_service(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf.v1 import trainer_pb2

    client = _client(args)
    request = trainer_pb2.StartRunRequest(
        run_id=args.run_id,
        config_yaml=_read_config(args.config),
        resume=args.resume,
    )
    for item in overrides:
        key, _, value = item.partition("=")
        request.overrides[key] = value
    status = client.start(request)
    print(f"run {status.run_id} started on {args.trainer} ({status.total_steps} steps)")
    if args.detach:
        return 0
    return watch_run(client, status.run_id, from_step=1)


# --- rlhf status / watch / stop / swap-reward ----------------------------------------------------
class Status:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Show a run on a trainer service: state, step, phase in progress, weight version, "
            "reward endpoints, checkpoint and the last step's statistics."
        )
        _add_trainer_address(parser)
        _add_run_id(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from rlhf.v1 import trainer_pb2

        status = _client(args).get(args.run_id)
        print(f"run        {status.run_id}")
        print(f"state      {state_name(status.state)}")
        print(f"step       {status.step} / {status.total_steps}")
        if status.HasField("progress") and status.progress.phase:
            p = status.progress
            phase = trainer_pb2.RunPhase.Name(p.phase).removeprefix("RUN_PHASE_").lower()
            retries = f", {p.retries} retries" if p.retries else ""
            print(f"phase      {phase} (step {p.step}) for {p.phase_elapsed_s:.0f} s{retries}")
            if p.last_error:
                print(f"last error {p.last_error}")
        print(f"weights    version {status.weight_version}")
        for r in status.rewards:
            print(f"reward     {r.name} @ {r.address} x {r.weight:g}")
        if status.checkpoint_dir:
            print(f"checkpoint {status.checkpoint_dir}")
        for key in ("env/reward_mean", "objective/kl", "ppo/loss/policy", "ppo/loss/value"):
            if key in status.last_metrics:
                print(f"{key:<18} {status.last_metrics[key]:.4f}")
        if status.error:
            print(f"error      {status.error}")
        if status.state == trainer_pb2.RUN_STATE_INTERRUPTED:
            print(f"resume     {resume_hint(args.trainer, status.run_id)}")
        return 0


class Watch:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Follow a run on a trainer service with a progress bar (phase in progress, elapsed "
            "time, reward, KL) until it ends; exit 0 if it completed or was stopped, 1 if it "
            "failed or was interrupted (the trainer stopped while it ran)."
        )
        _add_trainer_address(parser)
        _add_run_id(parser)
        parser.add_argument("--from-step", type=int, default=1, help="replay from this step")
        parser.add_argument(
            "--reconnect-s",
            type=float,
            default=RECONNECT_S,
            help="how long to wait for a trainer that went away mid-watch (restarted) before "
            f"giving up (default {RECONNECT_S:.0f})",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        return watch_run(_client(args), args.run_id, args.from_step, args.reconnect_s)


class Stop:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Stop a run: it finishes the step in progress, writes a checkpoint and ends "
            "(STOPPED). Answers at once; --wait follows the run until it has stopped."
        )
        _add_trainer_address(parser)
        _add_run_id(parser)
        parser.add_argument("--wait", action="store_true", help="watch until the run has ended")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        client = _client(args)
        status = client.stop(args.run_id)
        print(f"run {status.run_id}: {state_name(status.state)} at step {status.step}")
        if args.wait:
            return watch_run(client, status.run_id, from_step=0)
        return 0


class SwapReward:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Point a running run at other reward endpoints (a weighted sum), from its next "
            "step on. Each endpoint is probed first; on any failure nothing changes."
        )
        parser.add_argument(
            "endpoints",
            nargs="+",
            metavar="[NAME@]ADDRESSES[=WEIGHT]",
            help="the new reward sources",
        )
        _add_trainer_address(parser)
        _add_run_id(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        reply = _client(args).swap(args.run_id, args.endpoints)
        names = ", ".join(f"{r.name} @ {r.address} x {r.weight:g}" for r in reply.rewards)
        print(f"rewards from step {reply.effective_from_step}: {names}")
        return 0
