"""Where step statistics go: a JSON-lines file always, TensorBoard when log_with asks for it."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per step to metrics.jsonl; mirrors scalars to TensorBoard."""

    def __init__(self, folder: Path, log_with: str | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        self.tensorboard = None
        if log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(folder / "tensorboard"))
        elif log_with not in (None, "", "none", "jsonl"):
            raise ValueError(f"log_with={log_with!r}: use tensorboard, jsonl or none")

    def write(self, step: int, weight_version: int, stats: dict[str, float]) -> None:
        row = {"step": step, "weight_version": weight_version, **stats}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in stats.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows of steps after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
