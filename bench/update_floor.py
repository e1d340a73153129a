"""The fp32 matmul floor of a PPO update, for bench_seed.py: the FLOPs of one update (the
trainer's forward passes and the PPO epochs, i.e. `prepare` + `update`), counted once with
torch.utils.flop_counter.FlopCounterMode on an in-process replica step of the same shapes,
divided by the fp32 matmul rate measured here with the trainer's thread count (on its device).

    work = update_work(overrides, prompts, response_tokens)     # one replica step, counted
    rate = matmul_gflops(threads)                                # GFLOP/s, fp32
    floor_s = work.flops / (rate * 1e9)
    own_s = matmuls_seconds(work.matmuls, threads)               # its matmuls, at its shapes

The replica's responses are all `response_tokens` long (the measured mean), so no padding is
counted: the floor is the useful work, and padding a real step does shows above it.

The floor prices every FLOP at the rate of a large square matmul. The update's own matmuls are
small (a mini-batch is ~150 rows), and run slower than that; `matmuls_seconds` replays each of
them (recorded with its shapes, strides and dtype) on warm operands and adds their times: the
least those matmuls take on this machine, whatever else the update does.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMUL_SIZE = 2048
"""Side of the square fp32 matmuls the rate is measured on (17 GFLOP each: ~0.1 s on 2 cores)."""
GPU_MATMUL_SIZE = 8192
"""The same on a GPU, where a 2048 matmul is too short to reach the device's rate."""
MATMUL_REPEATS = 8
"""Timed matmuls (after two untimed ones); the rate is their median's."""


MATMUL_OPS = {
    torch.ops.aten.mm.default: "mm",
    torch.ops.aten.addmm.default: "addmm",
    torch.ops.aten.bmm.default: "bmm",
    torch.ops.aten.baddbmm.default: "baddbmm",
}
"""The matmul kernels a step's linear layers and their backward reach (attention is sdpa's)."""
_MATMUL_BY_NAME = {name: op for op, name in MATMUL_OPS.items()}
MATMUL_TIMING_S = 0.02
"""Least seconds of repeated calls timed per recorded matmul shape (after one untimed call)."""


@dataclass(frozen=True)
class MatmulCall:
    """One matmul kernel call as a step made it: its op and each tensor argument's layout."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    device: str

    @property
    def flops(self) -> int:
        """2 x the multiply-adds (mm/addmm: m x k x n; bmm/baddbmm: per batch)."""
        a, b = self.shapes[-2:]
        return 2 * math.prod(a) * b[-1]

    def operands(self) -> list[torch.Tensor]:
        """Random tensors of the call's shapes and strides (a broadcast bias's zero strides
        included: each is a view of random storage of the size its strides reach)."""
        tensors = []
        for shape, stride in zip(self.shapes, self.strides, strict=True):
            reach = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
            storage = torch.empty(reach, dtype=self.dtype, device=self.device).normal_()
            tensors.append(storage.as_strided(shape, stride))
        return tensors


class MatmulRecorder(TorchDispatchMode):
    """Counts the matmul kernel calls (MATMUL_OPS) made under it, by MatmulCall."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[MatmulCall] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        op = MATMUL_OPS.get(func)
        if op is not None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            call = MatmulCall(
                op,
                tuple(tuple(t.shape) for t in tensors),
                tuple(t.stride() for t in tensors),
                tensors[-1].dtype,
                str(tensors[-1].device),
            )
            self.calls[call] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class UpdateWork:
    """One replica update's FLOPs (FlopCounterMode) and its matmul calls (MatmulRecorder)."""

    flops: float
    matmuls: Counter[MatmulCall]


def update_work(
    overrides: Sequence[str], prompts: Sequence[str], response_tokens: int
) -> UpdateWork:
    """The work of one `prepare` + `update` of this project's learner at the run config that
    `overrides` make, on the first batch_size of `prompts` each with a random response of
    `response_tokens` tokens (scores 0)."""
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
    return count_work(
        lambda: trainer.update(trainer.prepare(queries, responses, torch.zeros(len(queries))))
    )


def count_work(run: Callable[[], object]) -> UpdateWork:
    """The FLOPs (FlopCounterMode) and matmul calls (MatmulRecorder) of `run()`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, MatmulRecorder() as recorder:
        run()
    return UpdateWork(float(counter.get_total_flops()), recorder.calls)


def matmuls_seconds(matmuls: Counter[MatmulCall], threads: int) -> float:
    """Seconds the recorded matmuls take, each replayed alone at its shapes with `threads` torch
    threads (restored afterwards): per distinct call, the mean of repeated calls on the same
    operands (warm caches: the least it takes), times how often the step made it. Calls on a GPU
    are timed between synchronizations."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    total = 0.0
    try:
        for call, count in matmuls.items():
            func = _MATMUL_BY_NAME[call.op]
            sync = torch.cuda.synchronize if call.device.startswith("cuda") else lambda: None
            operands = call.operands()
            func(*operands)  # first touches, the kernel's choice
            sync()
            repeats, started = 0, time.perf_counter()
            while repeats < 3 or time.perf_counter() - started < MATMUL_TIMING_S:
                func(*operands)
                sync()
                repeats += 1
            total += count * (time.perf_counter() - started) / repeats
    finally:
        torch.set_num_threads(before)
    return total


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
