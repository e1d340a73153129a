"""The PPO optimiser: AdamW without weight decay (TRL's Adam), fused where the device has it.

The fused kernel does the whole update in one pass over each parameter; on the 2-core CPU one
step over SmolLM2-135M's 134.5 M parameters took 0.058 s fused against 0.30 s with the default
for-each implementation (issue #14), eight times per seed-settings PPO step. Both implement the
same update; they differ only in float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

FUSED_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
"""Device types with torch's fused AdamW kernel (torch 2.13:
torch.utils._foreach_utils._get_fused_kernels_supported_devices, a private function)."""


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW (weight decay 0) over params, fused when their device type has the kernel."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICE_TYPES for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict(state), keeping this optimiser's implementation.

    load_state_dict takes the saved param groups' flags whole, so a checkpoint written before
    the fused step (fused None) would turn it off for the rest of the run; the flags are put
    back, and the step counts moved to the parameters' device as the fused kernel needs."""
    kept = [(group["fused"], group["foreach"]) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (fused, foreach) in zip(optimizer.param_groups, kept, strict=True):
        group["fused"], group["foreach"] = fused, foreach
        if not fused:
            continue
        for param in group["params"]:
            slots = optimizer.state.get(param, {})
            if "step" in slots:
                slots["step"] = slots["step"].to(device=param.device, dtype=torch.float32)


BUCKET_BYTES = 32 * 2**20
"""StepInBackward steps parameters in buckets of about this many bytes (consecutive parameters,
so a decoder layer's): one optimiser call per bucket rather than per tensor, whose fixed cost
(~0.15 ms on a CPU) over SmolLM2's 272 tensors added ~0.4 s to a seed-settings step."""


class StepInBackward:
    """Steps `optimizer` during the backward pass, a bucket of parameters as soon as all of
    their gradients are complete, and drops those gradients there (PyTorch's "optimizer step in
    backward" recipe, register_post_accumulate_grad_hook, stepped per bucket).

    Why: a full fine-tune's gradients are a whole model's worth of memory (540 MB for SmolLM2
    fp32) held from the backward pass to the step; stepped in the backward, about a bucket's
    worth exists at once. Same numbers: AdamW updates each element from its own gradient and
    state only, so stepping bucket by bucket gives what one step over all of them gives. Only
    where no step needs every gradient first: one process (no DDP/FSDP reduction), one
    mini-batch per step (no accumulation) and no clipping by the global norm; PPOTrainer
    decides.

    Each bucket gets an optimiser of the same kind that shares the main one's state (so
    checkpoints and load_state_dict see one AdamW, as before) and takes its hyperparameters at
    every step (a resumed run's loaded ones included). A bucket with a parameter that got no
    gradient steps the others when the backward pass ends, as a whole step skips a parameter
    without one. The hooks act only inside `stepping()`: any other backward accumulates
    gradients as usual.
    """

    def __init__(self, optimizer: torch.optim.AdamW, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.optimizer = optimizer
        self.active = False
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[torch.nn.Parameter, _Bucket] = {}
        for index, group in enumerate(optimizer.param_groups):
            chunk: list[torch.nn.Parameter] = []
            chunk_bytes = 0
            for param in group["params"]:
                chunk.append(param)
                chunk_bytes += param.numel() * param.element_size()
                if chunk_bytes >= bucket_bytes:
                    self._add_bucket(index, chunk)
                    chunk, chunk_bytes = [], 0
            if chunk:
                self._add_bucket(index, chunk)
        for param in self._bucket_of:
            # Looked up at each call, so a profiler can wrap `step` on the instance.
            param.register_post_accumulate_grad_hook(lambda p: self.ready(p))

    def _add_bucket(self, group_index: int, params: list[torch.nn.Parameter]) -> None:
        bucket = _Bucket(group_index, params, make_optimizer(params, 0.0))
        self._buckets.append(bucket)
        self._bucket_of.update(dict.fromkeys(params, bucket))

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Within the block (a backward pass), buckets step as their gradients complete; on
        leaving it, any bucket with gradients left steps too."""
        for bucket in self._buckets:
            bucket.waiting = len(bucket.params)
        self.active = True
        try:
            yield
        finally:
            self.active = False
        for bucket in self._buckets:
            if bucket.waiting < len(bucket.params):
                self.step(bucket)

    def ready(self, param: torch.nn.Parameter) -> None:
        """The hook: `param`'s gradient is complete; its bucket steps when it was the last."""
        if not self.active:
            return
        bucket = self._bucket_of[param]
        bucket.waiting -= 1
        if bucket.waiting == 0:
            self.step(bucket)

    def step(self, bucket: _Bucket) -> None:
        """One optimiser step over the bucket's parameters that have gradients; drops them."""
        main = self.optimizer.param_groups[bucket.group_index]
        bucket.optimizer.param_groups[0].update({k: v for k, v in main.items() if k != "params"})
        bucket.optimizer.state = self.optimizer.state  # load_state_dict replaces the main dict
        bucket.optimizer.step()
        for param in bucket.params:
            param.grad = None
        bucket.waiting = len(bucket.params)  # stepped: nothing left for the end of the pass


@dataclass
class _Bucket:
    group_index: int
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    waiting: int = 0
    """Parameters whose gradient this backward pass has not completed yet."""
