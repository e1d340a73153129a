"""Prompts for PPO: a JSONL file, a Hugging Face dataset folder, or the shipped prompt set.

Batches are drawn in a seeded shuffled order, epoch after epoch; the position (epoch, index) is
part of every checkpoint, so a resumed run sees exactly the prompts it would have seen.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

BUILTIN = "builtin"
"""Name of the shipped prompt set (services/trainer/orchestrator/prompts/default.jsonl)."""
BUILTIN_PATH = Path(__file__).parent / "prompts" / "default.jsonl"
PROMPT_FIELDS = ("prompt", "query", "text")


def load_prompts(source: str) -> list[str]:
    """Reads prompts from `source`: "builtin", a .jsonl file or a `datasets` folder."""
    path = BUILTIN_PATH if source in ("", BUILTIN) else Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take its train split
            if "train" not in dataset:
                raise ValueError(f"{path}: a DatasetDict needs a 'train' split")
            dataset = dataset["train"]
        field = next((f for f in PROMPT_FIELDS if f in dataset.column_names), None)
        if field is None:
            raise ValueError(f"{path}: no column named one of {PROMPT_FIELDS}")
        prompts = [str(p) for p in dataset[field]]
    elif path.is_file():
        prompts = []
        for number, row in enumerate(read_jsonl(path), start=1):
            field = next((f for f in PROMPT_FIELDS if f in row), None)
            if field is None:
                raise ValueError(f"{path}: row {number} needs one of the fields {PROMPT_FIELDS}")
            prompts.append(str(row[field]))
    else:
        raise FileNotFoundError(f"prompt source {source!r} is neither a file nor a folder")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    return prompts


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped); errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


class PromptSampler:
    """Draws batches in a seeded shuffled order; its state is (epoch, index)."""

    def __init__(self, prompts: list[str], seed: int) -> None:
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[str]:
        batch = []
        while len(batch) < size:
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.prompts[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.index = state["index"]
        self._order = self._shuffled(self.epoch)
