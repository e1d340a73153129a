"""Atomic checkpoint folders: written under a temporary name, renamed when complete.

Layout of a run's checkpoint root:
    step-000010/            one complete checkpoint (see TrainingLoop.save for its contents)
    step-000020/
    latest                  a text file naming the newest complete checkpoint folder
A crash while writing leaves a `.tmp-*` folder that is ignored (and removed next time), never
a half checkpoint that looks complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_FOLDER = re.compile(r"step-\d{6,}")


def replace_text(path: Path, text: str, durable: bool = False) -> None:
    """Writes `path` atomically: `text` goes to a temporary file beside it, renamed over it, so
    a reader (or a restart after a kill) sees the old content or the new, never half. With
    `durable` the bytes reach the disk before the rename (fsync), for a write-ahead record."""
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w") as out:
        out.write(text)
        if durable:
            out.flush()
            os.fsync(out.fileno())
    os.replace(staging, path)


def _folder_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """Calls write(tmp_folder), renames it to step-NNNNNN, points `latest` at it, prunes old."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write(staging)
        final = root / _folder_name(step)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_text(root / "latest", final.name + "\n")
    if keep > 0:
        complete = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None. The `latest` pointer must name a
    step-NNNNNN folder of root itself: a planted `../elsewhere` is refused."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not _FOLDER.fullmatch(name):
        raise ValueError(f"{pointer} names {name[:40]!r}, not a step-NNNNNN checkpoint folder")
    folder = root / name
    return folder if folder.is_dir() and not folder.is_symlink() else None
