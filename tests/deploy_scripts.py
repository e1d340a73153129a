"""Running a deploy/ shell script outside its container: the worktree's `rlhf` first on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`command` (e.g. ["sh", "deploy/compose/certs.sh"]) with `env` added, output captured;
    the caller checks the return code."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            **env,
        },
    )
