"""The TRL 0.11.4 side of a step-by-step comparison: bench/trl_seed_loop.py kept running in its
own venv (--stdin-steps), one measured step per call, so that a bench can alternate it with
another system (bench.measure.alternate) without reloading the models between steps.

    with TrlSide(trl_env.prepare(), model, seed=0, threads=2, device="cpu") as trl:
        row = trl.step()          # one measured step: {"seconds", "generate", ...}
    trl.summary                   # the loop's summary line, after the context ends
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.measure import stop

LOOP = Path(__file__).with_name("trl_seed_loop.py")


class TrlSide:
    """trl_seed_loop.py --stdin-steps as a child process; __enter__ waits for its warm-up."""

    def __init__(
        self,
        python: Path,
        model: Path,
        seed: int,
        threads: int,
        warmup: int = 1,
        device: str = "cpu",
    ) -> None:
        self.command = [
            str(python), str(LOOP), "--model", str(model), "--seed", str(seed),
            "--threads", str(threads), "--warmup", str(warmup), "--device", device,
            "--stdin-steps",
        ]  # fmt: skip
        self.summary: dict[str, Any] | None = None
        self.ready: dict[str, Any] | None = None
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> TrlSide:
        # stderr is inherited: the loop's warnings and a traceback show where the bench runs.
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = self._read()
        if not self.ready.get("ready"):
            raise RuntimeError(f"trl_seed_loop.py: expected the ready line, got {self.ready}")
        return self

    @property
    def pid(self) -> int:
        """The child's process id (its /proc entry holds its peak memory)."""
        assert self._process is not None, "TrlSide is not entered"
        return self._process.pid

    def step(self) -> dict[str, Any]:
        """Runs one measured step in the child; its JSON row."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write("step\n")
        self._process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise RuntimeError(f"trl_seed_loop.py exited ({code}) without a line: see its stderr")
        return json.loads(line)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        assert self._process is not None and self._process.stdin is not None
        if kind is None:
            self._process.stdin.close()  # EOF: the loop prints its summary and exits
            self.summary = self._read()
            if self._process.wait(timeout=60) != 0:
                raise RuntimeError(f"trl_seed_loop.py exited {self._process.returncode}")
        else:
            stop(self._process)
