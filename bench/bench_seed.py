"""The seed exercise's PPO loop: TRL 0.11.4 itself against this project's three services.

Side by side at the seed's own settings (issue #14):

  trl-0.11.4: bench/trl_seed_loop.py in the venv bench/trl_env.py prepares (offline, from the
              package registry), kept running through bench/trl_side.py: SmolLM2 fp32 full
              fine-tune, the seed's PPOConfig, one `generate` per query, VADER, `step`.
  fp32, bf16: the policy, reward (VADER) and trainer services as three processes with mutual
              TLS (bench/project_side.py, as `make run` starts them), PPO runs started through
              the trainer's API with the same settings as run config overrides. bf16: the
              policy service in bfloat16 and ppo.mixed_precision=bf16 (the TRL side stays
              fp32, as the seed ran). Both lock-step (run.max_staleness 0).
  fp32-overlap, bf16-overlap: the same at run.max_staleness 1: step t+1's rollout is generated
              and scored while step t's update runs, from the weights of step t-1.
  fp32-vllm, bf16-vllm: fp32 and bf16 with the policy service on the vllm engine (from
              .venv-vllm, `make install`), lock-step. Each stack holds its models for the
              whole bench: on the 24 GiB machine, run three stacks at most.

Rounds alternate the sides ABBA (trl fp32 bf16, bf16 fp32 trl, ...), so other load on the
machine slows all alike. A round is K steps (--steps) per side after its warm-up step. The TRL
child stays loaded and runs K steps per round. The project's services stay up for the whole
bench and each round is one run of 1 + K steps through the trainer's API, timed from the
warm-up step's metrics row to the last row: a run cannot be paused while the TRL side has the
machine, and one long run would compete with it; a run's start (model load, first weight push)
and its final checkpoint fall outside the timed span, as the TRL child's loading does.

Printed per side: episodes/s (median over rounds, range), seconds per step of each phase
(median), generated tokens/s, the update's seconds (forward passes included) over the fp32
matmul floor (bench/update_floor.py), peak memory (TRL: its process's VmHWM; the project: the
sum of its three processes'); then the ratios against the targets (>= 2.0x fp32, >= 4.0x bf16,
update <= 1.5x floor, memory <= 1.4x), each met or not met. Exit 0 when it ran: targets are
reported, not asserted.

    python bench/bench_seed.py                    # SmolLM2-135M-Instruct, 4 rounds x 3 steps,
                                                  # fp32, bf16 and fp32-overlap
    python bench/bench_seed.py --rounds 2 --steps 2
    python bench/bench_seed.py --quick            # tiny random model, 1 round x 1 step
    python bench/bench_seed.py --device cuda      # every side on the GPU
    python bench/bench_seed.py --device cuda:0 --policy-device cuda:1   # generation on its own

--device places every side: TRL's process (it sees that GPU alone), the trainer service
(ppo.device) and the policy service (--device, unless --policy-device gives it its own). The
reward service (VADER) computes on the CPU. On a GPU the memory that the targets judge is GPU
memory: each process's peak as nvidia-smi reports it (CUDA context included), sampled every
0.5 s over the whole bench; the host peaks are printed beside it. The floor is then the GPU's
fp32 matmul rate (TF32 off, as the trainer runs fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import seed_report  # noqa: E402
from bench.measure import GpuMemoryPeaks, alternate, peak_memory_mib  # noqa: E402
from bench.project_side import WARMUP_STEPS, ProjectStack, Variant, round_seconds  # noqa: E402
from bench.trl_seed_loop import MAX_NEW_TOKENS, SEED_PPO, SEED_QUERIES  # noqa: E402
from bench.update_floor import GPU_MATMUL_SIZE, MATMUL_SIZE  # noqa: E402
from tools.launch import Threads, service_threads  # noqa: E402

TRL = "trl-0.11.4"
"""The baseline side's name."""
BF16 = {"ppo.mixed_precision": "bf16"}
VARIANTS = {
    "fp32": Variant("fp32", "float32"),
    "bf16": Variant("bf16", "bfloat16", BF16),
    "fp32-overlap": Variant("fp32-overlap", "float32", staleness=1),
    "bf16-overlap": Variant("bf16-overlap", "bfloat16", BF16, staleness=1),
    "fp32-vllm": Variant("fp32-vllm", "float32", engine="vllm"),
    "bf16-vllm": Variant("bf16-vllm", "bfloat16", BF16, engine="vllm"),
}
DEFAULT_VARIANTS = "fp32,bf16,fp32-overlap"
PROMPTS_FILE = "seed-queries.jsonl"
"""The seed's four queries, one JSONL row each, in the trainer's --data-root."""


def _flags(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round x 1 step")
    parser.add_argument("--rounds", type=int, help="rounds per side, ABBA (default 4)")
    parser.add_argument("--steps", type=int, help="measured steps per round (default 3)")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"the project's variants, comma-separated, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seed", type=int, default=0, help="PPOConfig.seed of every side")
    parser.add_argument(
        "--device", default="cpu", help="every side's device: cpu, cuda or cuda:N (see above)"
    )
    parser.add_argument(
        "--policy-device", help="the policy service's own device (default: --device)"
    )
    parser.add_argument("--trl-threads", type=int, help="TRL's torch threads (default: all)")
    parser.add_argument("--policy-threads", type=int, help="policy service's threads")
    parser.add_argument("--trainer-threads", type=int, help="trainer service's threads")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 4)
    args.steps = args.steps or (1 if args.quick else 3)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}; got {unknown or 'none'}")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    for name in ("trl_threads", "policy_threads", "trainer_threads"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    from rlhf.models import parse_device

    args.policy_device = args.policy_device or args.device
    if args.policy_device != "cpu" and args.device == "cpu":
        # TRL would run on the CPU beside a project generating on a GPU: no comparison.
        parser.error("--policy-device on a GPU needs --device on one too (TRL, the trainer)")
    for flag, value in (("--device", args.device), ("--policy-device", args.policy_device)):
        try:
            parse_device(value)  # a GPU this machine lacks is refused here, not mid-bench
        except ValueError as error:
            parser.error(f"{flag}: {error}")
    return args


def _threads(args: argparse.Namespace, overlapping: bool) -> tuple[int, Threads, str]:
    """TRL's threads, the stack's threads, and why. The TRL process runs alone: every core. The
    policy and trainer processes follow make run's rule (tools.launch.service_threads): every
    core each in lock-step, the cores split between them when the rollout overlaps the update."""
    cores = 1 if args.quick else len(os.sched_getaffinity(0))
    chosen = service_threads(overlapping, cores)
    if args.quick:
        why = "--quick: one each"
    elif overlapping:
        why = f"{cores} cores, split: generation overlaps the update"
    else:
        why = f"{cores} cores, all to each: lock-step, they never compute at once"
    return (
        args.trl_threads or cores,
        Threads(args.policy_threads or chosen.policy, args.trainer_threads or chosen.trainer),
        why,
    )


def _text(value: object) -> str:
    """A value as an override's text: bools as true/false (str() would say True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """The seed's settings as run config overrides (every variant's)."""
    overrides = {f"ppo.{k}": _text(v) for k, v in SEED_PPO.items()}
    overrides.update(
        {
            "ppo.seed": str(args.seed),
            "ppo.use_lora": "false",
            "ppo.dtype": "float32",
            "ppo.device": args.device,
            "ppo.max_grad_norm": "none",  # TRL 0.11.4's PPOConfig default: no clipping
            "ppo.log_with": "jsonl",
            "generation.max_new_tokens": str(MAX_NEW_TOKENS),
            "generation.min_new_tokens": "0",  # the seed's min_length -1: EOS may end early
            "generation.top_k": "0",
            "generation.top_p": "1.0",
            "generation.temperature": "1.0",
            "generation.do_sample": "true",
            "generation.apply_chat_template": "false",
            "run.save_every": "0",
        }
    )
    return overrides


def _model(quick: bool, work: Path) -> Path:
    if quick:
        from tools.tiny import make_causal_lm

        return make_causal_lm(work / "tiny-lm")
    from rlhf.models import prepare_default_policy

    return Path(prepare_default_policy())


def _say(line: str) -> None:
    print(f"bench_seed: {line}", file=sys.stderr, flush=True)


def _said(side: str, seconds: float) -> float:
    """`seconds`, after a progress line: a SmolLM2 round takes minutes."""
    _say(f"{side}: a round of measured steps took {seconds:.1f} s")
    return seconds


def _measure(args: argparse.Namespace, setup: dict[str, Any], work: Path) -> dict[str, Any]:
    """Starts every side, runs the rounds ABBA, reads the peaks; the raw results."""
    from bench import trl_env
    from bench.trl_side import TrlSide

    python = trl_env.prepare(say=_say)
    data = work / "data"
    data.mkdir(parents=True)
    prompts = data / PROMPTS_FILE
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in SEED_QUERIES))
    overrides = {**setup["overrides"], "run.prompts": str(prompts)}
    rows: dict[str, list[dict[str, Any]]] = {TRL: []}
    with ExitStack() as stack:
        # A policy on a GPU needs --device on one too (_flags), so --device says it all.
        gpu = stack.enter_context(GpuMemoryPeaks()) if args.device != "cpu" else None
        _say(f"starting {TRL} (loading, warm-up step)")
        trl = stack.enter_context(
            TrlSide(
                python,
                setup["model"],
                args.seed,
                setup["trl_threads"],
                WARMUP_STEPS,
                device=args.device,
            )
        )
        stacks = {}
        for variant in setup["variants"]:
            _say(f"starting the {variant.name} services")
            stacks[variant.name] = stack.enter_context(
                ProjectStack(
                    variant,
                    setup["model"],
                    work / variant.name,
                    setup["threads"][variant.name],
                    overrides,
                    data,
                    policy_device=args.policy_device,
                )
            )
            rows[variant.name] = []

        def trl_round() -> float:
            steps = [trl.step() for _ in range(args.steps)]
            rows[TRL] += steps
            return _said(TRL, sum(s["seconds"] for s in steps))

        def project_round(name: str) -> Callable[[], float]:
            def run() -> float:
                run_rows = stacks[name].run_round(args.steps)
                rows[name] += run_rows[WARMUP_STEPS:]
                return _said(name, round_seconds(run_rows))

            return run

        sides = {TRL: trl_round, **{name: project_round(name) for name in stacks}}
        seconds = alternate(sides, args.rounds)
        # TRL's one process ran one run throughout; each stack's peak is its first run's.
        memory = {TRL: {"trl_seed_loop": peak_memory_mib(trl.pid)}}
        memory.update({name: s.first_run_peak_mib for name, s in stacks.items()})
        measured = {"rows": rows, "seconds": seconds, "memory": memory}
        if gpu is not None:
            pids = {TRL: {"trl_seed_loop": trl.pid}}
            # The reward service (VADER) has no GPU work: its absence is not a miss.
            pids.update({n: _gpu_services(s.pids(), args) for n, s in stacks.items()})
            measured["gpu_memory"] = _gpu_peaks(gpu, pids)
    return measured


def _gpu_services(pids: dict[str, int], args: argparse.Namespace) -> dict[str, int]:
    """The stack's processes that compute on a GPU."""
    devices = {"policy": args.policy_device, "trainer": args.device}
    return {n: pid for n, pid in pids.items() if devices.get(n, "cpu") != "cpu"}


def _gpu_peaks(gpu: GpuMemoryPeaks, pids: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Each side's GPU peaks by process, or why a side's are missing."""
    sides: dict[str, Any] = {}
    for side, named in pids.items():
        found, missing = gpu.peaks_of(named)
        if gpu.error:
            sides[side] = {"missing": f"sampling stopped: {gpu.error}"}
        elif missing:
            sides[side] = {
                "missing": f"nvidia-smi never listed {', '.join(missing)} (a container "
                "that hides the host's process ids?)"
            }
        else:
            sides[side] = found
    return sides


def _floor(args: argparse.Namespace, setup: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    """The fp32 matmul floor of the update at the measured mean response length, and the time
    of the update's own matmuls at their shapes."""
    from bench.update_floor import matmul_gflops, matmuls_seconds, update_work

    tokens = statistics.fmean(r["env/response_length"] for r in rows)
    work = update_work(
        [f"{k}={v}" for k, v in setup["overrides"].items() if not k.startswith("run.")]
        + [f"ppo.model_name={setup['model']}"],
        SEED_QUERIES,
        max(1, round(tokens)),
    )
    threads = setup["threads"][setup["variants"][0].name].trainer
    size = 256 if args.quick else GPU_MATMUL_SIZE if args.device != "cpu" else MATMUL_SIZE
    gflops = matmul_gflops(threads, size=size, device=args.device)
    return {
        "flops": work.flops,
        "response_tokens": round(tokens),
        "matmul_gflops": gflops,
        "threads": threads,
        "device": args.device,
        "seconds": work.flops / (gflops * 1e9),
        "own_matmuls": {
            "calls": sum(work.matmuls.values()),
            "flops": sum(call.flops * n for call, n in work.matmuls.items()),
            "seconds": matmuls_seconds(work.matmuls, threads),
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = _flags(argv)
    from rlhf.logs import setup_logging

    setup_logging("bench", "WARNING")
    started = time.monotonic()
    variants = [VARIANTS[name] for name in args.variants]
    trl_threads = _threads(args, overlapping=False)[0]
    threads = {v.name: _threads(args, overlapping=v.staleness > 0) for v in variants}
    work = Path(tempfile.mkdtemp(prefix="bench-seed-"))
    setup = {
        "model": _model(args.quick, work),
        "variants": variants,
        "overrides": _overrides(args),
        "threads": {name: chosen for name, (_, chosen, _) in threads.items()},
        "trl_threads": trl_threads,
    }
    notes = [
        f"devices: {TRL} {args.device}, trainer service {args.device}, "
        f"policy service {args.policy_device}, reward service (VADER) cpu",
        f"threads: {TRL} {trl_threads}",
    ]
    for name, (_, chosen, why) in threads.items():
        notes.append(f"threads: {name}: policy {chosen.policy}, trainer {chosen.trainer} ({why})")
    settings = setup["overrides"].items()
    notes.append("project settings: " + " ".join(f"{k}={v}" for k, v in settings))
    try:
        measured = _measure(args, setup, work)
    except BaseException:
        print(f"bench_seed: failed; the services' logs are under {work}", file=sys.stderr)
        raise
    floor = _floor(args, setup, measured["rows"][variants[0].name])
    results = seed_report.results(setup, measured, floor, notes, args.steps)
    results["wall_s"] = time.monotonic() - started
    print(seed_report.render(results, targets=not args.quick))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
