"""A run's state on disk, `<output root>/<run_id>/run.json`, and what a restarted trainer reads
back from a run folder.

run.json is written by the control API (atomically: a temporary file, then os.replace) on every
change of state, every reward swap and after every checkpoint:

    {"run_id", "state": "RUN_STATE_RUNNING", "total_steps", "error", "policy",
     "rewards": [spec, ...]  (in force), "swaps": [{"from_step", "rewards"}, ...],
     "config": {...}  (the TrainConfig, dataclasses.asdict), "updated": Unix seconds}

It is small and JSON only (a planted file can at worst fail to load). The step, weight version
and statistics a restarted trainer reports come from the run's latest checkpoint (its
trainer_state.json, no tensors) and metrics.jsonl, not from run.json: what was checkpointed is
what a resume continues from.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.v1 import trainer_pb2
from services.trainer.config import RUN_ID
from services.trainer.orchestrator.checkpoint import latest_checkpoint, replace_text
from services.trainer.orchestrator.loop import StepResult
from services.trainer.orchestrator.metrics import iter_rows, row_stats
from services.trainer.orchestrator.resume import Swap
from services.trainer.orchestrator.rewards import EndpointSpec
from services.trainer.orchestrator.trainer_state import read_summary

log = logging.getLogger("rlhf.trainer.records")
RECORD = "run.json"
MAX_RECORD_BYTES = 1024 * 1024
"""Largest run.json a restarted trainer reads (a run's is a few KB: mostly its config)."""
METRICS = "metrics.jsonl"


@dataclass
class RunRecord:
    """The content of run.json."""

    run_id: str
    state: str
    """A RunState name, e.g. RUN_STATE_RUNNING."""
    total_steps: int
    policy: str
    rewards: list[str]
    config: dict[str, Any]
    error: str = ""
    swaps: list[Swap] = field(default_factory=list)
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "state": self.state,
            "total_steps": self.total_steps,
            "error": self.error,
            "policy": self.policy,
            "rewards": list(self.rewards),
            "swaps": [s.to_json() for s in self.swaps],
            "config": self.config,
            "updated": self.updated,
        }

    @classmethod
    def from_json(cls, data: Any) -> RunRecord:
        """Raises ValueError naming the first field that is missing or of the wrong kind."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        kinds = {
            "run_id": str, "state": str, "total_steps": int, "error": str, "policy": str,
            "rewards": list, "swaps": list, "config": dict, "updated": (int, float),
        }  # fmt: skip
        for key, kind in kinds.items():
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                raise ValueError(f"field {key!r} is missing or not a {kind}")
        if data["state"] not in trainer_pb2.RunState.keys():
            raise ValueError(f"state {data['state'][:40]!r} is not a run state")
        if not all(isinstance(r, str) for r in data["rewards"]):
            raise ValueError("field 'rewards' holds a non-string")
        for text in data["rewards"]:
            EndpointSpec.parse(text)
        return cls(
            run_id=data["run_id"],
            state=data["state"],
            total_steps=data["total_steps"],
            policy=data["policy"],
            rewards=list(data["rewards"]),
            config=data["config"],
            error=data["error"],
            swaps=[Swap.from_json(s) for s in data["swaps"]],
            updated=float(data["updated"]),
        )


def write_record(folder: Path, record: RunRecord) -> None:
    """Writes run.json atomically (readers see the old file or the new one, never half)."""
    folder.mkdir(parents=True, exist_ok=True)
    replace_text(folder / RECORD, json.dumps(record.to_json()))


def read_record(folder: Path) -> RunRecord:
    """run.json of `folder`. Raises ValueError (OSError when unreadable) for a file that is a
    symlink, not a regular file, above MAX_RECORD_BYTES, or not a run record."""
    path = folder / RECORD
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a symlink or other)")
    if info.st_size > MAX_RECORD_BYTES:
        raise ValueError(f"{path} is {info.st_size} bytes, above {MAX_RECORD_BYTES}")
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    try:
        return RunRecord.from_json(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


@dataclass
class Checkpointed:
    """A run's latest checkpoint as GetRun reports it, and its finished steps up to it."""

    step: int = 0
    weight_version: int = 0
    checkpoint_dir: str = ""
    rewards: list[str] = field(default_factory=list)
    """The endpoints in force at the checkpoint (spec strings)."""
    last_metrics: dict[str, float] = field(default_factory=dict)
    history: list[tuple[StepResult, float]] = field(default_factory=list)
    """metrics.jsonl rows up to the checkpoint's step, each with the time it finished."""


def read_checkpointed(folder: Path) -> Checkpointed:
    """The latest checkpoint of the run in `folder` (its trainer_state.json only) and its
    metrics rows up to that step; a run without a checkpoint: step 0 and no rows. Raises
    ValueError or OSError for a checkpoint that cannot be read."""
    checkpoint = latest_checkpoint(folder / "checkpoints")
    found = Checkpointed()
    if checkpoint is not None:
        summary = read_summary(checkpoint)
        found.step, found.weight_version = summary["step"], summary["weight_version"]
        found.rewards = summary["rewards"]
        found.checkpoint_dir = str(checkpoint)
    metrics = folder / METRICS
    if found.step and metrics.is_file() and not metrics.is_symlink():
        for row in iter_rows(metrics):
            if row["step"] > found.step:
                continue  # redone by a resume, which truncates the file there
            stats = row_stats(row)
            version = stats.get("weight_version", 0.0)  # a statistic too, hence a float
            result = StepResult(row["step"], int(version), stats)
            found.history.append((result, float(row.get("time", 0.0))))
            if row["step"] == found.step:
                found.last_metrics = stats
    return found


def scan(root: Path) -> list[tuple[RunRecord, Checkpointed]]:
    """The runs recorded under `root`: its direct children named like a run id, not symlinks,
    holding a run.json. A folder whose run.json or checkpoint cannot be read is skipped with a
    WARNING naming it; the scan itself never fails on a run folder's content."""
    found = []
    try:
        children = sorted(root.iterdir())
    except OSError:
        return []  # no output root yet: no runs
    for child in children:
        if not RUN_ID.fullmatch(child.name) or not os.path.lexists(child / RECORD):
            continue
        try:
            if child.is_symlink() or not child.is_dir():
                raise ValueError("the run folder is a symlink or not a folder")
            record = read_record(child)
            if record.run_id != child.name:
                raise ValueError(f"run.json names run {record.run_id[:64]!r}")
            found.append((record, read_checkpointed(child)))
        except (OSError, ValueError) as err:
            log.warning("run folder skipped", extra={"path": str(child), "reason": str(err)})
    return found
