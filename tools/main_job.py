"""`make run`: the whole RLHF loop on the embedded defaults, as three services on localhost.

Starts the policy service (SmolLM2-135M-Instruct), the reward service (VADER sentiment) and the
trainer service as three OS processes, starts a PPO run on the shipped prompts through the
trainer's API, follows it with a progress bar, and ends with a summary table (statistics, then
seconds per phase and how much rollout overlapped training) and a PNG plot of reward and KL
beside the step timeline. `--precision` and `--max-staleness` choose the run's precision and
how far its rollout may run ahead of training; `--engine` the policy service's generation engine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.command_errors import CommandError
from rlhf.config.flags import int_at_least
from rlhf.defaults import DEFAULT_OUTPUT_DIR
from services.policy.config import ENGINES

if TYPE_CHECKING:  # grpc, the stubs and the launcher load only when a job runs
    from rlhf.v1.trainer_pb2 import RewardEndpoint, StartRunRequest
    from tools.launch import LocalPki, ServiceProcess

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
PRECISIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fp32": ((), ()),
    "bf16": (("--dtype", "bfloat16"), ("ppo.mixed_precision=bf16",)),
}
"""`--precision`: (policy service arguments, run config overrides) each choice adds. bf16 is
how users run on GPUs: a bf16 policy service, bf16 autocast in the trainer over fp32 master
weights. fp32 adds nothing (the services' and the config's defaults)."""
MIXED_PRECISION = {"no": "fp32", "bf16": "bf16 autocast over fp32 master weights"}
"""ppo.mixed_precision's values, as the header says them."""


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
    policy_args: Sequence[str] = (),
    trainer_threads: int = 0,
) -> PPOJobResult:
    """A PPO run across processes: starts a policy service on `model`, the reward services and
    a trainer service, starts the run (PPOConfig.model_name = `model`) through the trainer's
    API, follows it with a progress bar and stops the services. `overrides` are KEY=VALUE
    config fields (e.g. run.steps=2); `policy_args` further `rlhf policy serve` arguments
    (e.g. --dtype bfloat16); `trainer_threads` the trainer's torch threads (0: torch's
    default)."""
    from rlhf.v1 import trainer_pb2
    from tools.launch import LocalPki, running_services

    run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S")
    logs = output_dir / run_id / "logs"
    print(f"starting policy, reward and trainer services (logs in {logs}) ...", flush=True)
    started = time.monotonic()
    # Mutual TLS between the three: a development CA and certificates for this run.
    pki = LocalPki.make(output_dir / run_id / "certs")
    specs = [("policy", policy_command(model, policy_args))]
    specs += [(r.name, r.args) for r in rewards]
    with running_services(specs, logs, pki) as services:
        endpoints = [
            trainer_pb2.RewardEndpoint(address=services[r.name].address, weight=r.weight)
            for r in rewards
        ]
        trainer_args = _trainer_args(model, services["policy"].address, endpoints, output_dir)
        trainer_args += ["--threads", str(trainer_threads)]
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
            processes = [*services.values(), trainer["trainer"]]
            code = _follow_run(processes, pki, request, config, output_dir)
    return _result(code, output_dir / run_id, time.monotonic() - started)


def policy_command(model: str, policy_args: Sequence[str] = ()) -> list[str]:
    """`rlhf` arguments that serve `model` as the policy, with `policy_args` added."""
    return ["policy", "serve", "--model", model, *policy_args]


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
    processes: list[ServiceProcess],
    pki: LocalPki,
    request: StartRunRequest,
    config: Path,
    output_dir: Path,
) -> int:
    """Says where the services are, starts the run through the trainer (the last process; the
    policy service is the first), says its precision and staleness, and follows it to its end;
    the exit code of `rlhf watch`."""
    from rlhf.clients import PolicyClient
    from rlhf.protocol import TRAINER_SERVICE
    from services.trainer.api.client import TrainerClient
    from services.trainer.api.commands import watch_run
    from services.trainer.api.records import read_record
    from tools.launch import describe

    address = processes[-1].address
    print(f"services up:\n{describe(processes)}")
    print(f"  e.g. grpcurl {pki.grpcurl_flags()} {address} {TRAINER_SERVICE}/GetRun", flush=True)
    client = TrainerClient(address, client=pki.client())
    status = client.start(request)
    print(f"run {status.run_id}: {status.total_steps} PPO steps on {config.name}")
    # What the services use, as they say it: the trainer's run.json (its config with every
    # default filled in, written before StartRun answers) and the policy's GetInfo.
    policy = PolicyClient(processes[0].address, client=pki.client())
    info = policy.info()
    policy.close()
    print(settings_line(read_record(output_dir / status.run_id).config, info.dtype), flush=True)
    print(f"generation engine: {info.engine or 'hf'}", flush=True)  # empty: before #15
    code = watch_run(client, status.run_id, from_step=1)
    client.close()
    return code


def settings_line(config: Mapping[str, Any], policy_dtype: str) -> str:
    """The header's line on precision and staleness, from a run's config in run.json form
    (dataclasses.asdict of its TrainConfig) and the policy service's dtype. A trainer that
    predates either setting runs fp32 and lock-step, and the line says so."""
    mixed = config.get("ppo", {}).get("mixed_precision")
    if mixed is None:
        trainer = "fp32 (it has no ppo.mixed_precision)"
    else:  # a value this table does not know yet is shown as the config says it
        trainer = MIXED_PRECISION.get(mixed, f"ppo.mixed_precision={mixed}")
    staleness = config.get("run", {}).get("max_staleness")
    if staleness is None:
        overlap = "0, lock-step (the trainer has no run.max_staleness)"
    elif staleness == 0:
        overlap = "0, lock-step: each step's rollout waits for the previous update"
    else:
        overlap = (
            f"{staleness}: the rollout runs ahead under the update, on weights at most "
            f"{staleness} version(s) old"
        )
    return f"precision: policy service {policy_dtype}, trainer {trainer}; max staleness {overlap}"


def job_settings(precision: str, max_staleness: int | None) -> tuple[list[str], list[str]]:
    """(`rlhf policy serve` arguments, run config overrides) for `--precision` and
    `--max-staleness` (None: the config's run.max_staleness)."""
    policy_args, overrides = PRECISIONS[precision]
    staleness = [] if max_staleness is None else [f"run.max_staleness={max_staleness}"]
    return list(policy_args), [*overrides, *staleness]


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
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="bf16: the policy service in bfloat16 and the trainer's forward and backward passes "
        "in bf16 autocast (ppo.mixed_precision=bf16) over fp32 master weights",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="hf",
        help="the policy service's generation engine: hf (transformers) or vllm (from "
        ".venv-vllm, which `make install` builds)",
    )
    parser.add_argument(
        "--max-staleness",
        type=int_at_least(0),
        metavar="N",
        help="run.max_staleness: the rollout of step t+1 may run during step t's update, on "
        "weights at most N versions old (0: lock-step; default: the config's)",
    )
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except CommandError as err:  # e.g. the trainer went away: one line, as `rlhf` says it
        print(f"make run: {err}", file=sys.stderr)
        return 1


def _staleness(config: Path, overrides: Sequence[str]) -> int:
    """run.max_staleness of the run this config and these overrides make."""
    from services.trainer.config import load_train_config

    return load_train_config(config.read_text(), list(overrides)).run.max_staleness


def _main(args: argparse.Namespace) -> int:
    from rlhf.logs import setup_logging
    from rlhf.models import prepare_default_policy
    from tools.launch import service_threads
    from tools.report import summarize

    setup_logging("main", "WARNING")
    print("preparing the embedded SmolLM2-135M-Instruct (converted once, then cached) ...")
    model = str(prepare_default_policy())
    vader = RewardServiceSpec("reward", ["reward", "serve", "--backend", "vader"])
    policy_args, overrides = job_settings(args.precision, args.max_staleness)
    overrides += args.set  # last: a field --set names wins over the one a flag set
    threads = service_threads(_staleness(args.config, overrides) > 0)
    print(f"torch threads: policy {threads.policy}, trainer {threads.trainer}")
    result = run_ppo_job(
        model,
        [vader],
        args.config,
        args.output_dir,
        overrides=overrides,
        policy_args=[*policy_args, "--engine", args.engine, "--threads", str(threads.policy)],
        trainer_threads=threads.trainer,
    )
    if result.metrics:
        print(summarize(result.metrics, result.run_dir / "summary.png", result.seconds))
    return result.code


if __name__ == "__main__":
    sys.exit(main())
