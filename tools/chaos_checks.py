"""What the chaos test checks after its runs: the run completed, each step is in metrics.jsonl
exactly once, weight versions strictly increase, and the last checkpoint equals the
uninterrupted run's bit for bit (every tensor torch.equal, every other value ==)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from services.trainer.orchestrator.checkpoint import latest_checkpoint
from services.trainer.orchestrator.metrics import read_metrics
from services.trainer.orchestrator.trainer_state import read_state

RUN_SPECIFIC = ("weight_version", "config", "rewards")
"""Trainer-state entries that differ between two runs by design: the version numbers continue
from whatever the policy service served when the run began, the config names the run's id."""
MAX_LISTED = 10
"""Most differences listed per comparison (the first ones say enough)."""


def run_problems(run_dir: Path, steps: int) -> list[str]:
    """metrics.jsonl has rows for steps 1..steps, each once, in order; their weight versions
    strictly increase. Returns what is wrong, empty when nothing is."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [f"{path} is missing"]
    rows = read_metrics(path)
    problems = []
    seen = [int(row["step"]) for row in rows]
    if seen != list(range(1, steps + 1)):
        problems.append(f"{path}: steps {seen}, expected 1..{steps} each once")
    versions = [int(row["weight_version"]) for row in rows]
    if any(later <= earlier for earlier, later in zip(versions, versions[1:])):
        problems.append(f"{path}: weight versions {versions} do not strictly increase")
    return problems


def checkpoint_differences(chaos_run: Path, baseline_run: Path) -> list[str]:
    """Where the last checkpoints of two runs differ: their trainer state (policy weights,
    value head, optimizer, KL controller, RNGs, sampler, step) and every safetensors file."""
    folders = []
    for run_dir in (chaos_run, baseline_run):
        folder = latest_checkpoint(run_dir / "checkpoints")
        if folder is None:
            return [f"{run_dir} has no checkpoint"]
        folders.append(folder)
    chaos, baseline = folders
    if chaos.name != baseline.name:
        return [f"last checkpoints differ: {chaos.name} vs {baseline.name}"]
    found = _state_differences(chaos, baseline)
    found += _file_differences(chaos, baseline)
    return found[:MAX_LISTED] + (
        [f"... {len(found) - MAX_LISTED} more"] * (len(found) > MAX_LISTED)
    )


def _state_differences(chaos: Path, baseline: Path) -> list[str]:
    a, b = read_state(chaos), read_state(baseline)
    for key in RUN_SPECIFIC:
        a.pop(key, None)
        b.pop(key, None)
    return differences(a, b, "state")


def _file_differences(chaos: Path, baseline: Path) -> list[str]:
    """Every safetensors file of the checkpoint (the servable policy's weights among them)."""
    names = sorted(p.relative_to(baseline) for p in baseline.rglob("*.safetensors"))
    if names != sorted(p.relative_to(chaos) for p in chaos.rglob("*.safetensors")):
        return [f"the checkpoints hold different safetensors files: {names}"]
    found = []
    for name in names:
        found += differences(load_file(chaos / name), load_file(baseline / name), str(name))
    return found


def differences(a: Any, b: Any, where: str) -> list[str]:
    """Paths at which `a` and `b` differ: tensors by torch.equal (dtype and shape first),
    mappings and sequences element by element, anything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys differ ({sorted(map(str, a.keys() ^ b.keys()))})"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and type(a) is type(b):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r:.40} != {b!r:.40}"]
