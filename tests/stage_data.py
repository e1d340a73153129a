"""Tiny data sets for the stage tests (tests/test_stages.py, tests/test_pipeline.py), in words
of the tiny tokenizer's vocabulary (tools/tiny.py), so the tiny models see real tokens."""

from __future__ import annotations

import json
from pathlib import Path

SFT_ROWS = [
    ("tell me about the day", "what a wonderful day !"),
    ("write a short poem about a robot", "the robot is very happy and i love it !"),
    ("how was the movie ?", "a great film , really fun !"),
    ("what about the story ?", "a nice story , so good !"),
]
PAIRS = [
    ("tell me about the movie", "i love it , a great film !", "i hate it , a terrible film ."),
    ("how was the day ?", "a wonderful day , so happy", "an awful day , so sad"),
    ("what about the story ?", "really nice and fun", "really boring and bad"),
    ("hello", "hello ! what a nice day", "no . bad day"),
    ("write a poem", "a happy poem about love", "a sad poem about hate"),
    ("tell me about the robot", "the robot is friendly and good", "the robot is awful"),
    ("how is the film ?", "excellent ! very very good", "terrible , not good"),
    ("what is this ?", "this is great fun !", "this is boring"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_sft_data(folder: Path) -> Path:
    """SFT_ROWS twice, as prompt/completion rows."""
    rows = [{"prompt": p, "completion": c} for p, c in SFT_ROWS]
    return write_jsonl(folder / "sft.jsonl", rows * 2)


def write_pair_data(folder: Path) -> Path:
    """PAIRS as prompt/chosen/rejected rows."""
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    return write_jsonl(folder / "pairs.jsonl", rows)
