"""The PPO update on 1 process vs 2 data-parallel ranks (DDP on gloo), the cores split evenly.

Same model, same rollouts (fixed token ids), the seed's PPOConfig (batch 4, mini-batch 2,
4 PPO epochs): one process with --threads 2 against `torchrun --nproc-per-node 2` with one
thread per rank, in ABBA rounds, each side a fresh launch with its warm-up step excluded. It
prints each side's seconds per PPO step, the speed ratio (2 ranks over 1) per round with its
median and range, the peak resident memory of each side (all ranks together), the gradient
bytes each all-reduce moves, and whether the first step's statistics were the same on both
sides (data parallelism must not change the math; exit 1 if not).

On this 2-core machine the two sides have the same compute, so the ratio shows what splitting
costs (all-reduce, smaller matmuls, a model copy per rank), not what a second device gains; the
README says what to expect on real hardware.

    python bench/bench_ranks.py            # SmolLM2-135M fp32, 2 rounds (ABBA)
    python bench/bench_ranks.py --quick    # the tiny model, 1 round (AB)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import speed_ratios  # noqa: E402
from rlhf.defaults import DEFAULT_POLICY_MODEL  # noqa: E402

WORKER = ROOT / "bench" / "rank_steps.py"
CORES = 2
"""Threads in all, per side: one process gets them all, each of two ranks half."""
STAT_RTOL = 1e-3
"""How close the first step's statistics must be on both sides (float32 rounding of a split
batch; tests/test_data_parallel.py holds the learner to 1e-4 on the tiny model)."""


def launch(model: str, ranks: int, steps: int, out: Path) -> list[dict]:
    """One side's run; each rank's JSON report, in rank order."""
    threads = str(CORES // ranks)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    worker = [str(WORKER), model, str(out), "--threads", threads, "--steps", str(steps)]
    runner = [sys.executable]
    if ranks > 1:
        runner += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        runner + worker, cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(ranks)]


def same_stats(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= STAT_RTOL * abs(a[k]) for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one round")
    parser.add_argument("--model", default="", help=f"default: {DEFAULT_POLICY_MODEL}")
    parser.add_argument("--rounds", type=int, default=0, help="ABBA rounds (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 2, quick 1)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or DEFAULT_POLICY_MODEL
        if args.quick and not args.model:
            from tools.tiny import make_causal_lm

            model = str(make_causal_lm(Path(scratch) / "tiny"))
        order = [1, 2, 2, 1] * rounds if not args.quick else [1, 2] * rounds
        runs: dict[int, list[list[dict]]] = {1: [], 2: []}
        for ranks in order:
            reports = launch(model, ranks, steps, Path(scratch) / "reports")
            runs[ranks].append(reports)
            seconds = statistics.median(reports[0]["step_s"])
            print(f"{ranks} rank(s): {seconds:7.2f} s per PPO step", flush=True)

    one = [statistics.median(r[0]["step_s"]) for r in runs[1]]
    two = [statistics.median(r[0]["step_s"]) for r in runs[2]]
    ratios = speed_ratios(two, one)
    print(f"\nmodel {model}; batch 4, mini-batch 2, 4 PPO epochs, 64 response tokens")
    print(
        f"seconds per PPO step: 1 rank x {CORES} threads {statistics.median(one):.2f}, "
        f"2 ranks x {CORES // 2} thread {statistics.median(two):.2f}"
    )
    print(
        f"speed 2 ranks / 1 rank: median {statistics.median(ratios):.2f} "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"
    )
    peak_one = max(r[0]["peak_mib"] for r in runs[1])
    peak_two = max(sum(rank["peak_mib"] for rank in r) for r in runs[2])
    print(
        f"peak memory: 1 rank {peak_one:.0f} MiB, 2 ranks {peak_two:.0f} MiB together "
        f"({peak_two / peak_one:.2f}x: DDP keeps a whole model and optimiser per rank)"
    )
    print(f"gradient all-reduce per optimiser step: {runs[2][0][0]['allreduce_mb']:.1f} MB")
    same = same_stats(runs[1][0][0]["stats"], runs[2][0][0]["stats"])
    print(f"first step's statistics the same on both sides: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
