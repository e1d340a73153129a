"""The PPO optimiser: AdamW without weight decay (TRL's Adam), fused where the device has it.

The fused kernel does the whole update in one pass over each parameter; on the 2-core CPU one
step over SmolLM2-135M's 134.5 M parameters took 0.058 s fused against 0.30 s with the default
for-each implementation (issue #14), eight times per seed-settings PPO step. Both implement the
same update; they differ only in float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
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
