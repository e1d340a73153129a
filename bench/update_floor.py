"""The fp32 matmul floor of a PPO update, for bench_seed.py: the FLOPs of one update (the
trainer's forward passes and the PPO epochs, i.e. `prepare` + `update`), counted once with
torch.utils.flop_counter.FlopCounterMode on an in-process replica step of the same shapes,
divided by the fp32 matmul rate measured here with the trainer's thread count (on its device).

    flops = update_flops(overrides, prompts, response_tokens)   # one replica step, counted
    rate = matmul_gflops(threads)                                # GFLOP/s, fp32
    floor_s = flops / (rate * 1e9)

The replica's responses are all `response_tokens` long (the measured mean), so no padding is
counted: the floor is the useful work, and padding a real step does shows above it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

MATMUL_SIZE = 2048
"""Side of the square fp32 matmuls the rate is measured on (17 GFLOP each: ~0.1 s on 2 cores)."""
GPU_MATMUL_SIZE = 8192
"""The same on a GPU, where a 2048 matmul is too short to reach the device's rate."""
MATMUL_REPEATS = 8
"""Timed matmuls (after two untimed ones); the rate is their median's."""


def update_flops(overrides: Sequence[str], prompts: Sequence[str], response_tokens: int) -> float:
    """FLOPs of one `prepare` + `update` of this project's learner at the run config that
    `overrides` make, on the first batch_size of `prompts` each with a random response of
    `response_tokens` tokens (scores 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    from services.trainer.config import load_train_config
    from services.trainer.learner.ppo_trainer import PPOTrainer
    from services.trainer.learner.value_head import PolicyWithValueHead

    if response_tokens < 1:
        raise ValueError(f"response_tokens must be >= 1, got {response_tokens}")
    config = load_train_config(None, list(overrides)).ppo
    if len(prompts) < config.batch_size:
        raise ValueError(f"{len(prompts)} prompts given, batch_size is {config.batch_size}")
    model = PolicyWithValueHead.from_config(config)
    trainer = PPOTrainer(config, model)
    tokenizer = model.tokenizer
    # As the policy service encodes a prompt without a chat template.
    queries = [
        torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"])
        for text in prompts[: config.batch_size]
    ]
    generator = torch.Generator().manual_seed(0)
    responses = [
        torch.randint(0, tokenizer.vocab_size, (response_tokens,), generator=generator)
        for _ in queries
    ]
    with FlopCounterMode(display=False) as counter:
        batch = trainer.prepare(queries, responses, torch.zeros(len(queries)))
        trainer.update(batch)
    return float(counter.get_total_flops())


def matmul_gflops(
    threads: int,
    size: int = MATMUL_SIZE,
    repeats: int = MATMUL_REPEATS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """GFLOP/s of a size x size matmul in `dtype` (fp32 for the floor) on `device` with
    `threads` torch threads (median of `repeats`); the process's thread count is restored
    afterwards. On a GPU, torch's default fp32 matmul (TF32 off, as the trainer runs) is timed
    between synchronizations."""
    target = torch.device(device)
    sync = torch.cuda.synchronize if target.type == "cuda" else lambda: None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, device=target).to(dtype)
        b = torch.randn(size, size, device=target).to(dtype)
        for _ in range(2):  # first touches, the OpenMP team's start, the GPU's kernel choice
            torch.mm(a, b)
        sync()
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            sync()
            seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / statistics.median(seconds) / 1e9
