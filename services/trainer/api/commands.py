"""The commands a user drives runs with: `rlhf train`, `status`, `watch`, `swap-reward`.

Clients of the trainer's control API (TrainerService). Import-light (no torch here): the heavy
imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import sys
import time

from rlhf.config import add_env_argument

DEFAULT_TRAINER = "127.0.0.1:50053"


def _add_trainer_address(parser: argparse.ArgumentParser) -> None:
    add_env_argument(
        parser, "--trainer", default=DEFAULT_TRAINER, help="host:port of the trainer service"
    )


def _add_run_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default="", help="the run (default: the latest)")


# --- rlhf train ----------------------------------------------------------------------------------
class Train:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", default="", help="run config YAML (ppo/generation/run)")
        parser.add_argument(
            "--trainer",
            default="",
            help="start the run on this trainer service (host:port) and watch it; "
            "without it the loop runs in this process against the endpoints",
        )
        parser.add_argument("--policy", default="", help="PolicyService host:port")
        parser.add_argument(
            "--reward",
            action="append",
            default=[],
            metavar="HOST:PORT[=WEIGHT]",
            help="a reward endpoint (repeat for a weighted sum)",
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set learning_rate=1e-4 --set run.steps=5",
        )
        parser.add_argument("--run-id", default="", help="run name (and checkpoint folder)")
        parser.add_argument("--resume", action="store_true", help="continue from its checkpoint")
        parser.add_argument(
            "--detach", action="store_true", help="start on the trainer, don't watch"
        )

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


def _train_here(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from rlhf.logs import setup_logging
    from services.trainer.config import (
        DEFAULT_POLICY_ADDRESS,
        DEFAULT_REWARD_ADDRESS,
        load_train_config,
    )
    from services.trainer.orchestrator.loop import TrainingLoop, connect_rewards
    from services.trainer.orchestrator.rewards import EndpointSpec
    from services.trainer.orchestrator.transports import GrpcPolicy

    setup_logging("trainer")
    text = Path(args.config).read_text() if args.config else None
    config = load_train_config(text, overrides)
    config.run.policy = config.run.policy or DEFAULT_POLICY_ADDRESS
    config.run.rewards = config.run.rewards or [DEFAULT_REWARD_ADDRESS]
    config.run.output_dir = config.run.output_dir or "runs"
    mixer = connect_rewards([EndpointSpec.parse(r) for r in config.run.rewards])
    policy = GrpcPolicy(config.run.policy)
    loop = TrainingLoop(config, policy, mixer, resume=args.resume)
    bar = _progress(config.run.steps, initial=loop.step)
    try:
        loop.run(on_step=lambda r: _advance(bar, r.step, r.stats))
    finally:
        bar.close()
        mixer.close()
        policy.close()
    print(f"run {config.run.run_id}: {loop.step} steps; metrics in {loop.metrics.path}")
    return 0


def _train_on_service(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from rlhf.v1 import trainer_pb2
    from services.trainer.api.client import TrainerClient

    client = TrainerClient(args.trainer)
    request = trainer_pb2.StartRunRequest(
        run_id=args.run_id,
        config_yaml=Path(args.config).read_text() if args.config else "",
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


# --- rlhf status / watch / swap-reward ---------------------------------------------------------
class Status:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        _add_trainer_address(parser)
        _add_run_id(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from rlhf.v1 import trainer_pb2
        from services.trainer.api.client import TrainerClient

        status = TrainerClient(args.trainer).get(args.run_id)
        print(f"run        {status.run_id}")
        print(f"state      {trainer_pb2.RunState.Name(status.state).removeprefix('RUN_STATE_')}")
        print(f"step       {status.step} / {status.total_steps}")
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
        return 0


class Watch:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        _add_trainer_address(parser)
        _add_run_id(parser)
        parser.add_argument("--from-step", type=int, default=1, help="replay from this step")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from services.trainer.api.client import TrainerClient

        return watch_run(TrainerClient(args.trainer), args.run_id, args.from_step)


class SwapReward:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "endpoints", nargs="+", metavar="HOST:PORT[=WEIGHT]", help="the new reward endpoints"
        )
        _add_trainer_address(parser)
        _add_run_id(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import grpc

        from services.trainer.api.client import TrainerClient

        try:
            reply = TrainerClient(args.trainer).swap(args.run_id, args.endpoints)
        except grpc.RpcError as err:
            print(f"swap refused ({err.code().name}): {err.details()}", file=sys.stderr)
            return 1
        names = ", ".join(f"{r.name} @ {r.address} x {r.weight:g}" for r in reply.rewards)
        print(f"rewards from step {reply.effective_from_step}: {names}")
        return 0


def _progress(total: int, initial: int = 0):  # noqa: ANN202 - a tqdm bar
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _advance(bar, step: int, stats: dict[str, float]) -> None:  # noqa: ANN001
    bar.n = step
    bar.set_postfix(
        reward=f"{stats.get('env/reward_mean', float('nan')):+.3f}",
        kl=f"{stats.get('objective/kl', float('nan')):.3f}",
        version=int(stats.get("weight_version", 0)),
    )
    bar.refresh()


def watch_run(client, run_id: str, from_step: int) -> int:  # noqa: ANN001
    from rlhf.v1 import trainer_pb2

    status = client.get(run_id)
    bar = _progress(status.total_steps)
    try:
        for metrics in client.watch(status.run_id, from_step):
            _advance(bar, metrics.step, dict(metrics.metrics))
    finally:
        bar.close()
    for _ in range(100):  # the stream ends when the run does; its final state follows shortly
        status = client.get(status.run_id)
        if status.state not in (
            trainer_pb2.RUN_STATE_STARTING,
            trainer_pb2.RUN_STATE_RUNNING,
            trainer_pb2.RUN_STATE_STOPPING,
        ):
            break
        time.sleep(0.1)
    state = trainer_pb2.RunState.Name(status.state).removeprefix("RUN_STATE_")
    print(f"run {status.run_id}: {state} at step {status.step}/{status.total_steps}")
    if status.error:
        print(f"error: {status.error}", file=sys.stderr)
    return (
        0 if status.state in (trainer_pb2.RUN_STATE_COMPLETED, trainer_pb2.RUN_STATE_STOPPED) else 1
    )
