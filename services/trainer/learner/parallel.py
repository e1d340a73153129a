"""Data parallelism of the learner on torch.distributed (DDP, or FSDP2 for models that do not fit
one device): the process group, the model's wrapping, and the collectives the PPO step needs.

How a step is split (PPOTrainer does it with these helpers) so that N ranks compute what one
process computes for the same global batch:
- Every rank holds the whole batch's token ids and scores (rank 0 sends them,
  orchestrator/learner_group.py). `prepare` runs the forward passes of this rank's contiguous
  share of the rows, then all-gathers the old log-probs, values and reference log-probs, so
  rewards, GAE and the whitening of advantages are computed over the whole batch on every rank.
- The PPO epochs shuffle with the same seeded generator on every rank; each global mini-batch is
  split evenly, each rank runs forward/backward on its rows only. Its per-token log-probs,
  values and entropies are all-gathered (detached) and its own rows put back with their graph,
  so the loss and every statistic are the single-process functions of the whole mini-batch.
  Backward of world x loss through this rank's rows, averaged over ranks by DDP's all-reduce
  (FSDP: reduce-scatter), is exactly the single-process gradient.
Hence batch_size and mini_batch_size must be multiples of the world size.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

COMMAND_TIMEOUT = timedelta(days=365)
"""The command group's timeout: ranks > 0 wait there for rank 0's next command, which may come
after days of an idle trainer service."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel group."""

    rank: int
    world: int
    strategy: str
    """"ddp" or "fsdp"."""
    backend: str
    """The main group's backend: "gloo" or "nccl"."""
    commands: dist.ProcessGroup | None = None
    """A gloo group over the same ranks for rank 0's commands (CPU tensors, long timeout)."""

    @property
    def leader(self) -> bool:
        """Rank 0: the one that serves, talks to peers, checkpoints and pushes weights."""
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous share of `count` rows (count is a multiple of world)."""
        size = count // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def batch_problems(self, batch_size: int, mini_batch_size: int) -> list[str]:
        """Why a run's batch cannot be split evenly over the ranks (empty: it can)."""
        return [
            f"{name} ({value}) must be a multiple of the data-parallel world size ({self.world})"
            for name, value in (("batch_size", batch_size), ("mini_batch_size", mini_batch_size))
            if value % self.world
        ]


_process: DataParallel | None = None


def current() -> DataParallel | None:
    """The process's data-parallel group; None when it runs alone."""
    return _process


def world_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(strategy: str = "ddp", backend: str = "auto") -> DataParallel | None:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    None (and nothing initialised) when WORLD_SIZE is 1. `strategy` and `backend`: the trainer
    settings' data_parallel and dist_backend, checked there."""
    global _process
    if _process is not None:
        return _process
    if world_from_env() <= 1:
        return None
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Each rank drives the GPU of its local rank; a run's device "cuda" means that one.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    _process = DataParallel(dist.get_rank(), dist.get_world_size(), strategy, backend, commands)
    return _process


def shut_down() -> None:
    """Leaves the process group (at exit).

    Garbage is collected first: a finished run's DDP reducer or FSDP state can sit in a
    reference cycle, holding Gloo work objects whose tensors have Python references; freed at
    interpreter finalisation instead, they need the GIL there and the rank aborts ("terminate
    called without an active exception", seen at the end of finished 2-rank runs; pytorch/pytorch
    PR 179291 describes the mechanism)."""
    global _process
    if _process is not None and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _process = None


# --- the model -------------------------------------------------------------------------------
def wrap(model: nn.Module, dp: DataParallel) -> nn.Module:
    """The module the PPO epochs call: DDP(model), or `model` itself sharded in place by FSDP2
    (each decoder layer, then the root). Call before making the optimiser: FSDP2 replaces the
    parameters with sharded DTensors."""
    if dp.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the classes a transformers model names in _no_split_modules)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value: an FSDP2 DTensor gathered (a collective: every rank
    calls it, in the same order), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (a plain tensor: as it is)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(saved: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`saved` (a rank's shard as written) in the form of `current`: a DTensor with its mesh and
    placements when `current` is one."""
    from torch.distributed.tensor import DTensor

    if not isinstance(current, DTensor):
        return saved
    shard = current.to_local()
    if saved.shape != shard.shape:
        raise ValueError(f"a saved shard of shape {tuple(saved.shape)} for {tuple(shard.shape)}")
    return DTensor.from_local(
        saved.to(shard.device, shard.dtype),
        current.device_mesh,
        current.placements,
        shape=current.shape,
        stride=current.stride(),
    )


# --- collectives of the PPO step ---------------------------------------------------------------
def gather_rows(rows: torch.Tensor, dp: DataParallel, width: int) -> torch.Tensor:
    """Every rank's (b, w_r) rows, zero-padded to `width` columns, stacked in rank order:
    (world * b, width). Detached: gathered values carry no graph."""
    padded = torch.zeros(rows.shape[0], width, dtype=rows.dtype, device=rows.device)
    padded[:, : rows.shape[1]] = rows.detach()
    parts = [torch.empty_like(padded) for _ in range(dp.world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)


def with_own_rows(gathered: torch.Tensor, own: torch.Tensor, dp: DataParallel) -> torch.Tensor:
    """`gathered` with this rank's rows replaced by `own` (zero-padded to its width), whose graph
    they keep: the loss over the whole mini-batch backpropagates into this rank's rows only."""
    share = dp.share(gathered.shape[0])
    width = gathered.shape[1]
    if own.shape[1] < width:
        own = nn.functional.pad(own, (0, width - own.shape[1]))
    return torch.cat([gathered[: share.start], own, gathered[share.stop :]])
