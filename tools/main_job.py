"""`make run`: the whole RLHF loop on the embedded defaults, as three services on localhost.

Starts the policy service (SmolLM2-135M-Instruct), the reward service (VADER sentiment) and the
trainer service as three OS processes, starts a PPO run on the shipped prompts through the
trainer's API, follows it with a progress bar, and ends with a summary table and a PNG plot of
reward and KL per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.command_errors import CommandError
from rlhf.defaults import DEFAULT_OUTPUT_DIR

if TYPE_CHECKING:  # grpc, the stubs and the launcher load only when a job runs
    from rlhf.v1.trainer_pb2 import RewardEndpoint, StartRunRequest
    from tools.launch import LocalPki, ServiceProcess

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


@dataclass
class RewardServiceSpec:
    """One reward service for a PPO job: how to start it and its weight in the reward sum."""

    name: str
    """Process name (its log is <logs>/<name>.log)."""
    args: list[str]
    """`rlhf` arguments that serve it, e.g. ["reward", "serve", "--backend", "vader"]."""
    weight: float = 1.0


@dataclass
class PPOJobResult:
    code: int
    """0 when the run completed (or was stopped), 1 when it failed."""
    run_dir: Path
    """<output_dir>/<run_id>: metrics.jsonl, checkpoints/, logs/."""
    seconds: float
    metrics: list[dict[str, float]] = field(default_factory=list)


def run_ppo_job(
    model: str,
    rewards: Sequence[RewardServiceSpec],
    config: Path = DEFAULT_CONFIG,
    output_dir: Path = Path(DEFAULT_OUTPUT_DIR),
    run_id: str = "",
    overrides: Sequence[str] = (),
) -> PPOJobResult:
    """A PPO run across processes: starts a policy service on `model`, the reward services and
    a trainer service, starts the run (PPOConfig.model_name = `model`) through the trainer's
    API, follows it with a progress bar and stops the services. `overrides` are KEY=VALUE
    config fields (e.g. run.steps=2)."""
    from rlhf.v1 import trainer_pb2
    from tools.launch import LocalPki, running_services

    run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S")
    logs = output_dir / run_id / "logs"
    print(f"starting policy, reward and trainer services (logs in {logs}) ...", flush=True)
    started = time.monotonic()
    # Mutual TLS between the three: a development CA and certificates for this run.
    pki = LocalPki.make(output_dir / run_id / "certs")
    specs = [("policy", ["policy", "serve", "--model", model])]
    specs += [(r.name, r.args) for r in rewards]
    with running_services(specs, logs, pki) as services:
        endpoints = [
            trainer_pb2.RewardEndpoint(address=services[r.name].address, weight=r.weight)
            for r in rewards
        ]
        trainer_args = _trainer_args(model, services["policy"].address, endpoints, output_dir)
        with running_services([("trainer", trainer_args)], logs, pki) as trainer:
            request = trainer_pb2.StartRunRequest(
                run_id=run_id,
                config_yaml=config.read_text(),
                # The addresses travel in the request too: a config's run.policy / run.rewards
                # would otherwise win over the trainer's defaults.
                policy_address=services["policy"].address,
                rewards=endpoints,
                overrides=_overrides(model, overrides),
            )
            code = _follow_run([*services.values(), trainer["trainer"]], pki, request, config)
    return _result(code, output_dir / run_id, time.monotonic() - started)


def _trainer_args(
    model: str, policy: str, endpoints: Sequence[RewardEndpoint], output_dir: Path
) -> list[str]:
    """`rlhf trainer serve` pointed at the running policy and reward services."""
    args = [
        "trainer",
        "serve",
        "--policy",
        policy,
        "--reward",
        ",".join(f"{e.address}={e.weight:g}" for e in endpoints),
        "--output-dir",
        str(output_dir),
    ]
    if Path(model).is_dir():  # the trainer loads only models inside its --model-root
        args += ["--model-root", model]
    return args


def _follow_run(
    processes: list[ServiceProcess], pki: LocalPki, request: StartRunRequest, config: Path
) -> int:
    """Says where the services are, starts the run through the trainer (the last process) and
    follows it to its end; the exit code of `rlhf watch`."""
    from rlhf.protocol import TRAINER_SERVICE
    from services.trainer.api.client import TrainerClient
    from services.trainer.api.commands import watch_run
    from tools.launch import describe

    address = processes[-1].address
    print(f"services up:\n{describe(processes)}")
    print(f"  e.g. grpcurl {pki.grpcurl_flags()} {address} {TRAINER_SERVICE}/GetRun", flush=True)
    client = TrainerClient(address, client=pki.client())
    status = client.start(request)
    print(f"run {status.run_id}: {status.total_steps} PPO steps on {config.name}")
    code = watch_run(client, status.run_id, from_step=1)
    client.close()
    return code


def _result(code: int, folder: Path, seconds: float) -> PPOJobResult:
    """The job's result, with the run's metrics rows when it wrote any."""
    from services.trainer.orchestrator.metrics import read_metrics

    path = folder / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    return PPOJobResult(code, folder, seconds, rows)


def _overrides(model: str, items: Sequence[str]) -> dict[str, str]:
    """StartRunRequest.overrides: the model to train, then each KEY=VALUE item."""
    overrides = {"ppo.model_name": model}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    from rlhf.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="make run",
        description="PPO on the embedded defaults (SmolLM2-135M-Instruct, VADER), as three "
        "services on localhost: policy, reward and trainer; ends with a per-step table and "
        "<output-dir>/<run>/summary.png.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config YAML")
    parser.add_argument(
        "--output-dir", type=Path, default=Path(DEFAULT_OUTPUT_DIR), help="run folders"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except CommandError as err:  # e.g. the trainer went away: one line, as `rlhf` says it
        print(f"make run: {err}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from rlhf.logs import setup_logging
    from rlhf.models import prepare_default_policy
    from tools.report import summarize

    setup_logging("main", "WARNING")
    print("preparing the embedded SmolLM2-135M-Instruct (converted once, then cached) ...")
    model = str(prepare_default_policy())
    vader = RewardServiceSpec("reward", ["reward", "serve", "--backend", "vader"])
    result = run_ppo_job(model, [vader], args.config, args.output_dir, overrides=args.set)
    if result.metrics:
        print(summarize(result.metrics, result.run_dir / "summary.png", result.seconds))
    return result.code


if __name__ == "__main__":
    sys.exit(main())
