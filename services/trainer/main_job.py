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
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config YAML")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"), help="run folders")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from rlhf.launch import running_services
    from rlhf.logs import setup_logging
    from rlhf.models import prepare_default_policy
    from rlhf.v1 import trainer_pb2
    from services.trainer.cli import _watch
    from services.trainer.client import TrainerClient
    from services.trainer.metrics import read_metrics
    from services.trainer.report import summarize

    setup_logging("main", "WARNING")
    run_id = time.strftime("run-%Y%m%d-%H%M%S")
    print("preparing the embedded SmolLM2-135M-Instruct (converted once, then cached) ...")
    model = str(prepare_default_policy())
    logs = args.output_dir / run_id / "logs"
    print(f"starting policy, reward and trainer services (logs in {logs}) ...", flush=True)
    started = time.monotonic()
    specs = [
        ("policy", ["policy", "serve", "--model", model]),
        ("reward", ["reward", "serve", "--backend", "vader"]),
    ]
    with running_services(specs, logs) as services:
        trainer_args = [
            "trainer",
            "serve",
            "--policy",
            services["policy"].address,
            "--reward",
            services["reward"].address,
            "--output-dir",
            str(args.output_dir),
        ]
        with running_services([("trainer", trainer_args)], logs) as trainer:
            client = TrainerClient(trainer["trainer"].address)
            request = trainer_pb2.StartRunRequest(
                run_id=run_id, config_yaml=args.config.read_text()
            )
            request.overrides["ppo.model_name"] = model
            for item in args.set:
                key, _, value = item.partition("=")
                request.overrides[key] = value
            status = client.start(request)
            print(f"run {status.run_id}: {status.total_steps} PPO steps on {args.config.name}")
            code = _watch(client, status.run_id, from_step=1)
            client.close()
    elapsed = time.monotonic() - started
    folder = args.output_dir / run_id
    rows = read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    if rows:
        print(summarize(rows, folder / "summary.png", elapsed))
    return code


if __name__ == "__main__":
    sys.exit(main())
