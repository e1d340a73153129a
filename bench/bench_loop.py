"""The PPO loop through the services vs the same loop in one process without gRPC.

Both sides run the very same TrainingLoop (services/trainer/orchestrator/loop.py) on the same
config, seed and prompts; only the transports differ:
  services:   GrpcPolicy -> `rlhf policy serve` (own process), GrpcReward -> `rlhf reward
              serve` (own process); weights go over UpdateWeights each step.
  in-process: LocalPolicy (the same PolicyEngine in this process), LocalReward (the same VADER
              backend in this process); weights are copied into the engine each step.
Same seeds mean both sides sample the same tokens, so they do the same work. Each side runs one
warm-up step (not timed), then `--steps` timed steps, alternating between the sides step by step
(ABBA) so that other load on the machine slows both alike. Printed: each phase's median seconds
per step (generate / score / reference+values / update / weight sync), each side's episodes/s
at its median step, and the ratio: the median of the steps' ratios (step i of one side ran
right beside step i of the other, under the same load; one step slowed by other work must not
decide the result). Target: services >= 0.95 x in-process.

    python bench/bench_loop.py            # SmolLM2-135M-Instruct with configs/default.yaml
    python bench/bench_loop.py --quick    # a tiny random model: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import alternate, speed_ratio  # noqa: E402

if TYPE_CHECKING:  # the heavy imports happen in the functions that use them
    from services.trainer.config import TrainConfig
    from services.trainer.orchestrator.loop import TrainingLoop
    from tools.launch import LocalPki

TARGET = 0.95
PHASES = ["time/generate", "time/score", "time/ref_values", "time/update", "time/weight_sync"]


def _measure_alternating(
    loops: dict, steps: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """One warm-up step per side, then `steps` timed steps alternating between the sides (ABBA),
    so that whatever else loads the machine loads both alike. Returns ({side: seconds of each
    step}, {side: median seconds per phase})."""
    for loop in loops.values():
        loop.run_step()  # warm-up: first-touch allocations, lazy initialisation
    rows: dict[str, list[dict[str, float]]] = {side: [] for side in loops}

    def timed_step(side: str) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            rows[side].append(loops[side].run_step().stats)
            return time.perf_counter() - started

        return run

    seconds = alternate({side: timed_step(side) for side in loops}, steps)
    phases = {
        side: {k: statistics.median(r[k] for r in rows[side]) for k in PHASES + ["time/step"]}
        for side in loops
    }
    return seconds, phases


def _flags() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--quick", action="store_true", help="tiny random model")
    return parser.parse_args()


def _model(quick: bool, work: Path) -> str:
    """A tiny random model (--quick) or the default policy, as a path."""
    if quick:
        from tools.tiny import make_causal_lm

        return str(make_causal_lm(work / "tiny"))
    from rlhf.models import prepare_default_policy

    return str(prepare_default_policy())


def _loop_config(args: argparse.Namespace, model: str, work: Path, name: str) -> TrainConfig:
    """The run config both sides share, under the run id `name`; nothing is checkpointed."""
    from services.trainer.config import load_train_config

    overrides = [
        f"ppo.model_name={model}",
        "ppo.log_with=jsonl",
        f"run.output_dir={work}",
        f"run.run_id={name}",
        "run.save_every=0",
        "run.max_staleness=0",  # lock-step: the two loops alternate step by step in one process
    ]
    return load_train_config(Path(args.config).read_text() if args.config else None, overrides)


def _local_loop(config: TrainConfig, model: str) -> TrainingLoop:
    """The loop on in-process transports: no gRPC, no other process."""
    from bench.local_transports import LocalPolicy, LocalReward
    from services.reward.backends.vader import VaderBackend
    from services.trainer.orchestrator.loop import TrainingLoop
    from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer

    mixer = RewardMixer(lambda address: LocalReward(VaderBackend(), address=address))
    mixer.set_endpoints([EndpointSpec("local:0")])
    return TrainingLoop(config, LocalPolicy(model), mixer)


def _grpc_loop(config: TrainConfig, services: dict, pki: LocalPki) -> TrainingLoop:
    """The loop on the gRPC transports, as the trainer's certificate, to the running services."""
    from services.trainer.orchestrator.loop import TrainingLoop
    from services.trainer.orchestrator.rewards import EndpointSpec, RewardMixer
    from services.trainer.orchestrator.transports import GrpcPolicy, GrpcReward

    client = pki.client("trainer")
    mixer = RewardMixer(lambda address: GrpcReward(address, client))
    mixer.set_endpoints([EndpointSpec(services["reward"].address)])
    policy = GrpcPolicy(services["policy"].address, client)
    return TrainingLoop(config, policy, mixer)


def _print_table(
    steps: int,
    model: str,
    episodes: int,
    seconds: dict[str, list[float]],
    phases: dict[str, dict[str, float]],
) -> None:
    local_phases, grpc_phases = phases["local"], phases["grpc"]
    local_rate = episodes / statistics.median(seconds["local"])
    grpc_rate = episodes / statistics.median(seconds["grpc"])
    ratio = speed_ratio(seconds["grpc"], seconds["local"])
    print(f"\nPPO loop, {steps} timed steps per side, model {Path(model).name}")
    print(f"{'phase (median s/step)':<22}{'in-process':>12}{'services':>12}")
    for key in PHASES + ["time/step"]:
        label = key.removeprefix("time/")
        print(f"{label:<22}{local_phases[key]:>12.3f}{grpc_phases[key]:>12.3f}")
    print(f"{'episodes/s':<22}{local_rate:>12.3f}{grpc_rate:>12.3f}")
    for side, label in (("local", "in-process"), ("grpc", "services")):
        print(f"seconds per step, {label}: " + ", ".join(f"{s:.2f}" for s in seconds[side]))
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(
        f"ratio services / in-process (median of the steps' ratios): {ratio:.3f} "
        f"(target >= {TARGET}: {verdict})"
    )


def main() -> int:
    args = _flags()
    from rlhf.logs import setup_logging
    from tools.launch import LocalPki, running_services

    setup_logging("bench", "WARNING")
    work = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    model = _model(args.quick, work)
    specs = [
        ("policy", ["policy", "serve", "--model", model]),
        ("reward", ["reward", "serve", "--backend", "vader"]),
    ]
    pki = LocalPki.make(work / "certs")  # the services serve mutual TLS, as `make run` does
    with running_services(specs, work / "logs", pki) as services:
        loops = {
            "local": _local_loop(_loop_config(args, model, work, "local"), model),
            "grpc": _grpc_loop(_loop_config(args, model, work, "grpc"), services, pki),
        }
        seconds, phases = _measure_alternating(loops, args.steps)
    episodes = loops["local"].config.ppo.batch_size
    _print_table(args.steps, model, episodes, seconds, phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
