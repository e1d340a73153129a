"""Where one seed-settings PPO update goes, and how far it is from the fp32 matmul floor.

Runs PPOTrainer.step in this process on the embedded SmolLM2-135M-Instruct at the seed's
settings (full fine-tune, batch 4, mini-batch 2, 4 PPO epochs; the seed's four queries without
a chat template, 64-token responses), and prints per step:
  prepare    the old policy's and the reference's forward passes (trainer.prepare)
  targets    rewards, KL and GAE
  forward    the PPO epochs' forward passes and losses (with grad)
  backward   the epochs' backward passes (and the gradient clipping, zero_grad)
  optimizer  the optimiser steps (within the backward pass where PPOTrainer.step_in_backward)
  stats      the step's statistics and KL control
with the update's FLOPs (torch.utils.flop_counter.FlopCounterMode over one step), the matmul
GFLOP/s measured here (fp32 and bf16), the fp32 floor: FLOPs / fp32 GFLOP/s, and the step's own
matmuls replayed alone at their shapes (bench/update_floor.py): the least they take here.

    python -m bench.profile_update --threads 2                 # fp32 and bf16 on SmolLM2
    python -m bench.profile_update --precision fp32 --compile  # eager vs torch.compile
    python -m bench.profile_update --quick                     # the tiny test model: a smoke run

One warm-up step (FLOPs counted there) precedes the measured steps; the table shows each
phase's median over those. Responses vary in length a little from step to step, as sampled
ones do, so torch.compile meets the shape changes a real run brings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.trl_seed_loop import BATCH_SIZE, MAX_NEW_TOKENS, SEED_QUERIES

if TYPE_CHECKING:
    from services.trainer.learner.config import PPOConfig
    from services.trainer.learner.ppo_trainer import PPOTrainer

PHASES = ("prepare", "targets", "forward", "backward", "optimizer", "stats")
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
"""--precision -> PPOConfig.mixed_precision."""


def _flags(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test model (smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's own)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per precision")
    parser.add_argument("--precision", choices=[*PRECISIONS, "both"], default="both")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also run the steps with the policy's and reference's decoders under torch.compile "
        "and report the compile seconds (first step minus a steady one) and the per-step gain",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 0:
        parser.error("--steps must be >= 1 and --threads >= 0")
    return args


# --- the model and the rollouts -----------------------------------------------------------------
def model_folder(quick: bool, scratch: Path) -> Path:
    if quick:
        from tools.tiny import make_causal_lm

        return make_causal_lm(scratch / "tiny-lm")
    from rlhf.models import prepare_default_policy

    return prepare_default_policy()


def rollouts(trainer: PPOTrainer, step: int, response_len: int) -> tuple[list, list, Any]:
    """The seed's four queries (no chat template), responses of random tokens whose lengths
    vary a little with the step (sampled responses do), random scores."""
    import torch

    g = torch.Generator().manual_seed(step)
    tokenizer = trainer.tokenizer
    queries = [torch.tensor(tokenizer(q)["input_ids"]) for q in SEED_QUERIES[:BATCH_SIZE]]
    vocab = len(tokenizer)
    shorter = [0, (5 * step) % 11, 0, (3 * step) % 7]
    lengths = [max(1, response_len - s) for s in shorter]
    responses = [torch.randint(6, vocab, (n,), generator=g) for n in lengths]
    return queries, responses, torch.randn(BATCH_SIZE, generator=g)


def seed_config(folder: Path, precision: str, pack: bool = True) -> PPOConfig:
    """The seed's PPO settings on the model in `folder`; `pack`: PPOConfig.pack_sequences."""
    from services.trainer.learner.config import PPOConfig

    extra: dict[str, Any] = {"pack_sequences": pack}
    if precision != "fp32":
        extra["mixed_precision"] = PRECISIONS[precision]
    # max_grad_norm None: the seed's (TRL's default) no clipping, as bench_seed runs it.
    knobs: dict[str, Any] = {"model_name": str(folder), "log_with": None, "max_grad_norm": None}
    return PPOConfig(**knobs, **extra)


def make_trainer(folder: Path, precision: str, pack: bool = True) -> PPOTrainer:
    """A trainer at the seed's settings (seed_config)."""
    from services.trainer.learner.ppo_trainer import PPOTrainer
    from services.trainer.learner.value_head import PolicyWithValueHead

    config = seed_config(folder, precision, pack)
    return PPOTrainer(config, PolicyWithValueHead.from_config(config))


# --- timing the phases --------------------------------------------------------------------------
class PhaseTimer:
    """Wraps a trainer's pieces (instance attributes only, the class untouched) so that each
    step's seconds per phase add up in `seconds`."""

    def __init__(self, trainer: PPOTrainer) -> None:
        self.seconds: dict[str, float] = {}
        self._wrap(trainer, "prepare", "prepare")
        self._wrap(trainer, "targets", "targets")
        self._wrap(trainer, "_minibatch_loss", "forward")
        self._wrap(trainer.optimizer, "step", "optimizer")
        if trainer.step_in_backward is not None:  # the buckets' steps, within the backward
            self._wrap(trainer.step_in_backward, "step", "optimizer")
        self._wrap(trainer, "_epochs", "_epochs")

    def _wrap(self, owner: object, name: str, phase: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(phase):
                return inner(*args, **kwargs)

        setattr(owner, name, timed)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def step(self, trainer: PPOTrainer, batch: tuple[list, list, Any]) -> dict[str, float]:
        """One step's seconds per phase (and "total")."""
        self.seconds = {}
        t = time.perf_counter()
        trainer.step(*batch)
        total = time.perf_counter() - t
        s = self.seconds
        epochs = s.pop("_epochs")
        s["backward"] = epochs - s["forward"] - s["optimizer"]
        s["stats"] = total - s["prepare"] - s["targets"] - epochs
        return {**s, "total": total}


def compile_decoders(trainer: PPOTrainer) -> None:
    """torch.compile (inductor) on the decoders the trainer's forward passes call."""
    from services.trainer.learner.value_head import base_model

    for lm in (trainer.model.lm, trainer.ref_model):
        if lm is not None:
            base_model(lm).get_decoder().compile()


def run_precision(
    folder: Path, precision: str, args: argparse.Namespace, compiled: bool = False
) -> dict[str, Any]:
    """Warm-up (FLOPs counted; with `compiled`, the compile happens here and is timed), then the
    measured steps: their per-phase medians."""
    trainer = make_trainer(folder, precision)
    response_len = 8 if args.quick else MAX_NEW_TOKENS
    result: dict[str, Any] = {"precision": precision, "compiled": compiled}
    if compiled:
        compile_decoders(trainer)
        timer = PhaseTimer(trainer)
        result["first_step_s"] = timer.step(trainer, rollouts(trainer, 0, response_len))["total"]
    else:
        import torch

        from bench.update_floor import count_work, matmuls_seconds

        # One whole step (prepare + update) counted: its FLOPs and matmul calls.
        batch = rollouts(trainer, 0, response_len)
        work = count_work(lambda: trainer.step(*batch))
        result["flops"] = work.flops
        # The warm-up step's matmuls, replayed alone at their shapes (update_floor).
        result["own_matmuls_s"] = matmuls_seconds(work.matmuls, torch.get_num_threads())
        timer = PhaseTimer(trainer)
    steps = [
        timer.step(trainer, rollouts(trainer, i, response_len)) for i in range(1, 1 + args.steps)
    ]
    result["median_s"] = {k: statistics.median(s[k] for s in steps) for k in (*PHASES, "total")}
    result["totals_s"] = [s["total"] for s in steps]
    return result


# --- report -------------------------------------------------------------------------------------
def print_table(results: list[dict[str, Any]], gflops: dict[str, float]) -> None:
    names = [r["precision"] + (" compiled" if r["compiled"] else "") for r in results]
    print(f"{'phase (median s/step)':24}" + "".join(f"{n:>16}" for n in names))
    for phase in (*PHASES, "total"):
        row = "".join(f"{r['median_s'][phase]:16.3f}" for r in results)
        print(f"{phase:24}{row}")
    flops = next(r["flops"] for r in results if "flops" in r)
    floor = flops / (gflops["fp32"] * 1e9)
    print(
        f"\nstep FLOPs {flops / 1e9:.4g} GFLOP; matmul GFLOP/s: fp32 {gflops['fp32']:.0f}, ",
        end="",
    )
    print(f"bf16 {gflops['bf16']:.0f}; fp32 floor {floor:.2f} s")
    for name, r in zip(names, results, strict=True):
        line = f"{name}: {r['median_s']['total'] / floor:.2f}x the fp32 floor"
        if "own_matmuls_s" in r:
            own = r["own_matmuls_s"]
            line += (
                f"; its matmuls alone at their shapes {own:.2f} s = {own / floor:.2f}x the "
                f"floor, the step {r['median_s']['total'] / own:.2f}x them"
            )
        if r["compiled"]:
            line += f"; first step (compiling) {r['first_step_s']:.1f} s"
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = _flags(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # before any torch work, as the services do
    from bench.update_floor import matmul_gflops

    gflops = {
        name: matmul_gflops(torch.get_num_threads(), dtype=dtype)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    precisions = list(PRECISIONS) if args.precision == "both" else [args.precision]
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(args.quick, Path(scratch))
        results = [run_precision(folder, p, args) for p in precisions]
        if args.compile:
            results += [run_precision(folder, p, args, compiled=True) for p in precisions]
    print_table(results, gflops)
    summary = {"threads": torch.get_num_threads(), "gflops": gflops, "results": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
