"""The PPO update on packed sequences against right-padded rows (PPOConfig.pack_sequences), side
by side on the same sampled rollouts.

Two settings (--settings):
  seed      the seed's (the default): SmolLM2 fp32 full fine-tune, batch 4, mini-batch 2, 4
            epochs, no clipping; the seed's four queries without a chat template, up to 64 new
            tokens with EOS allowed, so response lengths vary as a run's do (a response that ends
            at once beside three that run to the cap is common).
  make-run  configs/default.yaml's, what `make run` trains: LoRA r16 on every linear layer,
            batch 8, mini-batch 4, 2 epochs; the shipped prompts in the chat template, 20 new
            tokens (responses and prompts of nearly one length: little padding to save).
Responses are sampled by the policy engine at the settings' knobs, a seed per batch; scores are
random. Two trainers from the same weights, one packing its forward passes, one padding them; a
round is one PPO step (prepare + update) on each, on the same batch, sides alternating ABBA; the
warm-up round is not timed, and its statistics are compared.

Printed: seconds per step on each side (median, range), the speed ratio packed / padded
(median of the rounds' ratios, range), the share of the padded side's decoder tokens that were
padding, and the largest relative difference between the two sides' first-step statistics
(packing changes the kernels' shapes, so float rounding, not the math).

    python bench/bench_packing.py                      # the seed's settings, 6 rounds
    python bench/bench_packing.py --settings make-run  # make run's
    python bench/bench_packing.py --quick              # the tiny test model: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import alternate, speed_ratio, speed_ratios  # noqa: E402
from bench.profile_update import model_folder, seed_config  # noqa: E402
from bench.trl_seed_loop import BATCH_SIZE, MAX_NEW_TOKENS, SEED_QUERIES  # noqa: E402

if TYPE_CHECKING:
    import torch

    from services.trainer.config import GenerationConfig
    from services.trainer.learner.config import PPOConfig
    from services.trainer.learner.ppo_trainer import PPOTrainer

Rollouts = tuple[list["torch.Tensor"], list["torch.Tensor"], "torch.Tensor"]
SETTINGS = ("seed", "make-run")
"""--settings' choices (the module's docstring says what each is)."""
SIDES = {"packed": True, "padded": False}
"""Side name -> PPOConfig.pack_sequences."""
STATS_COMPARED_ABOVE = 1e-3
"""First-step statistics smaller than this in magnitude on the padded side are left out of the
relative difference (near zero, a relative difference says nothing)."""


def _flags(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test model (smoke run)")
    parser.add_argument("--settings", choices=SETTINGS, default="seed", help="see the docstring")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (one step a side)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's own)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 0:
        parser.error("--rounds must be >= 1 and --threads >= 0")
    return args


@dataclass(frozen=True)
class Setup:
    """What both sides train with and what their rollouts are sampled from."""

    ppo: PPOConfig
    """The trainers' settings (each side sets pack_sequences)."""
    prompts: list[str]
    """Batch i takes the next ppo.batch_size of them, round the list."""
    generation: GenerationConfig
    """The sampling knobs, as a run config's generation section gives them."""


def setup(settings: str, folder: Path, quick: bool) -> Setup:
    """--settings as a Setup on the model in `folder` (--quick: 8 new tokens at most)."""
    from services.trainer.config import GenerationConfig, load_train_config
    from services.trainer.orchestrator.data import load_prompts
    from tools.main_job import DEFAULT_CONFIG

    if settings == "seed":
        generation = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, apply_chat_template=False)
        found = Setup(seed_config(folder, "fp32"), list(SEED_QUERIES[:BATCH_SIZE]), generation)
    else:
        config = load_train_config(DEFAULT_CONFIG.read_text(), [f"ppo.model_name={folder}"])
        ppo = dataclasses.replace(config.ppo, log_with=None)
        found = Setup(ppo, load_prompts(config.run.prompts), config.generation)
    if quick:
        return dataclasses.replace(
            found, generation=dataclasses.replace(found.generation, max_new_tokens=8)
        )
    return found


def sample_rollouts(folder: Path, how: Setup, batches: int) -> list[Rollouts]:
    """`batches` batches of ppo.batch_size prompts with responses sampled by the policy engine
    at `how`'s knobs, one sampling seed per batch; random scores."""
    import torch

    from services.policy.engine import PolicyEngine
    from services.policy.server import params_from_proto
    from services.trainer.orchestrator.transports import generation_params

    engine = PolicyEngine(str(folder))
    size = how.ppo.batch_size
    out = []
    for seed in range(batches):
        prompts = [how.prompts[(seed * size + i) % len(how.prompts)] for i in range(size)]
        # The knobs as a run's Generate call carries them to the policy service's engine.
        params = params_from_proto(generation_params(how.generation, seed))
        done = engine.generate(prompts, params)
        out.append(
            (
                [torch.tensor(c.prompt_token_ids) for c in done],
                [torch.tensor(c.response_token_ids) for c in done],
                torch.randn(size, generator=torch.Generator().manual_seed(seed)),
            )
        )
    return out


def make_trainer(how: Setup, pack: bool) -> PPOTrainer:
    from services.trainer.learner.ppo_trainer import PPOTrainer
    from services.trainer.learner.value_head import PolicyWithValueHead

    config = dataclasses.replace(how.ppo, pack_sequences=pack)
    return PPOTrainer(config, PolicyWithValueHead.from_config(config))


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
    (time/ entries left out), and its name ("none: all equal" when every one is equal)."""
    diffs = [
        (abs(a[k] - b[k]) / abs(b[k]), k)
        for k in b
        if k in a and not k.startswith("time/") and abs(b[k]) >= STATS_COMPARED_ABOVE
    ]
    worst = max(diffs)
    return worst if worst[0] > 0 else (0.0, "none: all equal")


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
        how = setup(args.settings, folder, args.quick)
        batches = sample_rollouts(folder, how, 1 + args.rounds)
        trainers = {side: make_trainer(how, pack) for side, pack in SIDES.items()}
        first: dict[str, Any] = {side: t.step(*batches[0]) for side, t in trainers.items()}
        # Each side steps through the same batches in the same order: round i is batch i on both.
        queues = {side: iter(batches[1:]) for side in SIDES}

        def side_round(side: str) -> Callable[[], float]:
            return lambda: timed_step(trainers[side], next(queues[side]))

        seconds = alternate({side: side_round(side) for side in SIDES}, args.rounds)
    share = padding_share(batches[1:], how.ppo.mini_batch_size)
    report(seconds, share, largest_difference(first["packed"], first["padded"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
