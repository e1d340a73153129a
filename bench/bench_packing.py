"""The PPO update on packed sequences against right-padded rows (PPOConfig.pack_sequences), side
by side on the same sampled rollouts.

Rollouts: the seed's four queries without a chat template, responses sampled by the policy
engine at the seed's settings (up to 64 new tokens, EOS allowed, top_k 0, top_p 1.0, a seed per
batch), so their lengths vary as a run's do (a response that ends at once beside three that run
to the cap is common). Two trainers from the same weights at the seed's PPO settings (SmolLM2
fp32 full fine-tune, batch 4, mini-batch 2, 4 epochs, no clipping), one packing its forward
passes, one padding them; a round is one PPO step (prepare + update) on each, on the same batch,
sides alternating ABBA; the warm-up round is not timed, and its statistics are compared.

Printed: seconds per step on each side (median, range), the speed ratio packed / padded
(median of the rounds' ratios, range), the share of the padded side's decoder tokens that were
padding, and the largest relative difference between the two sides' first-step statistics
(packing changes the kernels' shapes, so float rounding, not the math).

    python bench/bench_packing.py              # SmolLM2-135M-Instruct, 6 rounds
    python bench/bench_packing.py --rounds 10  # more rounds
    python bench/bench_packing.py --quick      # the tiny test model: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import alternate, speed_ratio, speed_ratios  # noqa: E402
from bench.profile_update import make_trainer, model_folder  # noqa: E402
from bench.trl_seed_loop import BATCH_SIZE, MAX_NEW_TOKENS, SEED_QUERIES  # noqa: E402

if TYPE_CHECKING:
    import torch

    from services.trainer.learner.ppo_trainer import PPOTrainer

Rollouts = tuple[list["torch.Tensor"], list["torch.Tensor"], "torch.Tensor"]
SIDES = {"packed": True, "padded": False}
"""Side name -> PPOConfig.pack_sequences."""
STATS_COMPARED_ABOVE = 1e-3
"""First-step statistics smaller than this in magnitude on the padded side are left out of the
relative difference (near zero, a relative difference says nothing)."""


def _flags(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test model (smoke run)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (one step a side)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's own)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 0:
        parser.error("--rounds must be >= 1 and --threads >= 0")
    return args


def sample_rollouts(folder: Path, batches: int, max_new_tokens: int) -> list[Rollouts]:
    """`batches` batches of the seed's queries with responses sampled by the policy engine at
    the seed's settings, one sampling seed per batch; random scores."""
    import torch

    from services.policy.engine import PolicyEngine
    from services.policy.validation import SamplingParams

    engine = PolicyEngine(str(folder))
    queries = list(SEED_QUERIES[:BATCH_SIZE])
    out = []
    for seed in range(batches):
        params = SamplingParams(
            max_new_tokens=max_new_tokens, top_k=0, top_p=1.0, temperature=1.0, seed=seed
        )
        done = engine.generate(queries, params)
        out.append(
            (
                [torch.tensor(c.prompt_token_ids) for c in done],
                [torch.tensor(c.response_token_ids) for c in done],
                torch.randn(BATCH_SIZE, generator=torch.Generator().manual_seed(seed)),
            )
        )
    return out


def padding_share(batches: list[Rollouts], mini_batch_size: int) -> float:
    """The share of decoder tokens that are padding when each mini-batch (taken in order, as the
    prepare pass takes them) is right-padded to its longest sequence."""
    real = padded = 0
    for queries, responses, _ in batches:
        lengths = [len(q) + len(r) for q, r in zip(queries, responses, strict=True)]
        for start in range(0, len(lengths), mini_batch_size):
            chunk = lengths[start : start + mini_batch_size]
            real += sum(chunk)
            padded += len(chunk) * max(chunk)
    return 1 - real / padded


def largest_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    """The largest |a - b| / |b| over the statistics both have with |b| >= STATS_COMPARED_ABOVE
    (time/ entries left out), and its name."""
    diffs = [
        (abs(a[k] - b[k]) / abs(b[k]), k)
        for k in b
        if k in a and not k.startswith("time/") and abs(b[k]) >= STATS_COMPARED_ABOVE
    ]
    return max(diffs)


def timed_step(trainer: PPOTrainer, batch: Rollouts) -> float:
    t = time.perf_counter()
    trainer.step(*batch)
    return time.perf_counter() - t


def report(seconds: dict[str, list[float]], share: float, diff: tuple[float, str]) -> None:
    for side, values in seconds.items():
        print(
            f"{side:>7}: s/step median {statistics.median(values):.3f} "
            f"(range {min(values):.3f}-{max(values):.3f}, {len(values)} rounds)"
        )
    ratios = speed_ratios(seconds["packed"], seconds["padded"])
    print(
        f"speed packed / padded: median {speed_ratio(seconds['packed'], seconds['padded']):.3f} "
        f"(rounds {min(ratios):.3f}-{max(ratios):.3f})"
    )
    print(f"padding share of the padded side's decoder tokens: {share:.3f}")
    print(f"first step's statistics, largest relative difference: {diff[0]:.2e} ({diff[1]})")


def main(argv: list[str] | None = None) -> int:
    args = _flags(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(args.quick, Path(scratch))
        max_new_tokens = 8 if args.quick else MAX_NEW_TOKENS
        batches = sample_rollouts(folder, 1 + args.rounds, max_new_tokens)
        trainers = {side: make_trainer(folder, "fp32", pack=pack) for side, pack in SIDES.items()}
        first: dict[str, Any] = {side: t.step(*batches[0]) for side, t in trainers.items()}
        # Each side steps through the same batches in the same order: round i is batch i on both.
        queues = {side: iter(batches[1:]) for side in SIDES}

        def side_round(side: str) -> Callable[[], float]:
            return lambda: timed_step(trainers[side], next(queues[side]))

        seconds = alternate({side: side_round(side) for side in SIDES}, args.rounds)
    share = padding_share(batches[1:], trainers["padded"].config.mini_batch_size)
    report(seconds, share, largest_difference(first["packed"], first["padded"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
