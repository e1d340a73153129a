"""Prepares the TRL 0.11.4 baseline's own venv, .cache/bench/trl-0.11.4, from the package
registry pip is configured with (no model hub): python3.11, torch first and alone, then the pins
of bench/trl-0.11.4.txt. It never touches the project's .venv.

Idempotent: a stamp in the venv records the requirements it was built from; when it matches,
a call returns at once. A missing or stale stamp (an interrupted or older preparation) means the
folder is removed and built again. A failed pip prints pip's own output and exits non-zero.

    python bench/trl_env.py          # prepare (or find prepared); prints the venv's python
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).with_name("trl-0.11.4.txt")
VENV = ROOT / ".cache" / "bench" / "trl-0.11.4"
STAMP = ".prepared"
"""File in the venv holding the sha256 of the requirements it was built from."""
PYTHON_VERSION = (3, 11)
PIP_OUTPUT_LINES = 80
"""How much of a failed pip's output is printed (its error is at the end)."""


class PrepareError(RuntimeError):
    """The venv could not be prepared; the message holds the failing command's output."""


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def _digest(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def _pins(requirements: Path) -> tuple[str, list[str]]:
    """(the torch pin, every other pin) from the requirements file."""
    lines = [ln.strip() for ln in requirements.read_text().splitlines()]
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    torch = [p for p in pins if p.lower().startswith("torch==")]
    if len(torch) != 1:
        raise PrepareError(f"{requirements}: needs exactly one torch==VERSION line")
    return torch[0], [p for p in pins if p != torch[0]]


def _base_python() -> str:
    """A python3.11 to build the venv from (the venv module uses the base interpreter)."""
    if sys.version_info[:2] == PYTHON_VERSION:
        return sys.executable
    found = shutil.which("python{}.{}".format(*PYTHON_VERSION))
    if found is None:
        raise PrepareError("python3.11 is not on PATH: the TRL 0.11.4 venv needs it")
    return found


def _run(command: list[str], log: list[str]) -> None:
    """Runs `command` quietly; on failure raises with the tail of its output."""
    log.append(" ".join(command))
    # No VIRTUAL_ENV/PYTHONPATH from the caller: pip must see only the venv it runs in.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).splitlines()[-PIP_OUTPUT_LINES:]
        raise PrepareError(
            f"`{' '.join(command)}` failed (exit {done.returncode}):\n" + "\n".join(output)
        )


def is_prepared(venv: Path = VENV, requirements: Path = REQUIREMENTS) -> bool:
    stamp = venv / STAMP
    return stamp.is_file() and stamp.read_text().strip() == _digest(requirements)


def _silent(line: str) -> None:
    pass


def prepare(
    venv: Path = VENV, requirements: Path = REQUIREMENTS, say: Callable[[str], None] = _silent
) -> Path:
    """The venv's python, building the venv first unless its stamp matches `requirements`.
    `say` receives one line per thing done. Raises PrepareError with pip's output on failure."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Two callers at once (a test and a bench) would build into the same folder.
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(venv, requirements):
            say(f"{venv}: prepared already (stamp matches {requirements.name})")
            return venv_python(venv)
        torch_pin, rest = _pins(requirements)
        if venv.exists():
            say(f"{venv}: no matching stamp; removing it to build afresh")
            shutil.rmtree(venv)
        started = time.perf_counter()
        log: list[str] = []
        python = str(venv_python(venv))
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run([_base_python(), "-m", "venv", str(venv)], log)
        say(f"created {venv}")
        _run([*pip, torch_pin], log)
        say(f"installed {torch_pin}")
        _run([*pip, "-r", str(requirements)], log)
        say(f"installed {len(rest)} pins from {requirements.name}")
        _run([python, "-c", "import torch, transformers, trl, vaderSentiment"], log)
        (venv / STAMP).write_text(_digest(requirements) + "\n")
        say(f"prepared {venv} in {time.perf_counter() - started:.0f} s")
        return venv_python(venv)


def main() -> int:
    try:
        python = prepare(say=lambda line: print(line, file=sys.stderr, flush=True))
    except PrepareError as err:
        print(f"trl_env: {err}", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
