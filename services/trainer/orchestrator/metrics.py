"""Where step statistics go: a JSON-lines file always, TensorBoard when log_with asks for it.

Each metrics.jsonl row is {"step", "weight_version", "time" (Unix seconds the step finished),
then the step's statistics}. The file outlives the trainer process: a restarted trainer replays
it to WatchRun callers, and a resume truncates it to its checkpoint's step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.trainer.orchestrator.checkpoint import replace_text

log = logging.getLogger("rlhf.trainer.metrics")
ROW_KEYS = ("step", "time")
"""Row keys that are not statistics ("weight_version" is both: a key and a statistic)."""


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
        row = {"step": step, "weight_version": weight_version, "time": time.time(), **stats}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in stats.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows of steps after the checkpoint (they will be redone), and a row
        torn by a kill mid-write. Rewritten atomically: a second kill leaves the old file."""
        if not self.path.exists():
            return
        kept = [json.dumps(row) + "\n" for row in iter_rows(self.path) if row["step"] <= step]
        replace_text(self.path, "".join(kept))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a metrics file; a line that is not a row (torn by a kill while it was being
    written) is skipped with a WARNING naming the file and line."""
    with path.open(errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                log.warning("metrics row skipped", extra={"path": str(path), "line": number})
                continue
            yield row


def read_metrics(path: Path) -> list[dict[str, float]]:
    return list(iter_rows(path))


def row_stats(row: dict[str, Any]) -> dict[str, float]:
    """A row's statistics, as the step reported them (its numbers without step and time)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in ROW_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }
