"""`rlhf reward serve`: flag checks, and the process serving on --port 0, stopping on SIGTERM,
refusing to start on a bad configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf.channels import wait_until_serving
from rlhf.v1 import reward_pb2_grpc
from services.reward import cli
from services.reward.backends import build_backend
from tests.reward.common import args_for, score_texts

ROOT = Path(__file__).resolve().parents[2]


def test_bad_flag_combinations_are_refused(tiny_classifier: Path) -> None:
    assert "needs --model" in (cli.check_flags(args_for("--backend", "hf-classifier")) or "")
    assert "needs --keywords" in (cli.check_flags(args_for("--backend", "keyword")) or "")
    assert cli.check_flags(args_for("--backend", "vader")) is None
    assert cli.ignored_flags(args_for("--backend", "vader", "--model", "x")) == ["--model"]
    model = ("--backend", "hf-classifier", "--model", str(tiny_classifier))
    with pytest.raises(ValueError, match="not one of the model's labels: NEGATIVE, POSITIVE"):
        build_backend(args_for(*model, "--label", "NEUTRAL"))
    with pytest.raises(ValueError, match="choose one with --label"):
        build_backend(args_for(*model, "--logit"))
    with pytest.raises(ValueError, match="choose one with --label"):
        build_backend(args_for(*model))


def rlhf_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "reward", "serve", *argv]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}


class ServiceLog:
    """Reads a service process's JSON log lines (stderr) on a thread; `port` is set from its
    "listening" line, when it binds."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self.bound = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"listening"' in line and not self.bound.is_set():
                self.port = int(json.loads(line)["address"].rsplit(":", 1)[1])
                self.bound.set()
        self.bound.set()  # the process ended: stop waiting

    def text(self) -> str:
        self._thread.join(10)
        return "".join(self.lines)


def test_process_serves_and_exits_zero_on_sigterm() -> None:
    argv = ("--backend", "vader", "--host", "127.0.0.1", "--port", "0", "--grace-s", "2")
    proc = subprocess.Popen(
        rlhf_command(*argv),
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = ServiceLog(proc)
    try:
        assert log.bound.wait(60) and log.port, "".join(log.lines)
        with grpc.insecure_channel(f"127.0.0.1:{log.port}") as channel:
            wait_until_serving(channel, "rlhf.v1.RewardService", timeout_s=30)
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            analyzer = SentimentIntensityAnalyzer()
            expected = analyzer.polarity_scores("What a great day!")["compound"]
            assert score_texts(stub, ["What a great day!"]) == pytest.approx([expected], abs=1e-6)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.text()
    assert proc.returncode == 0, stderr
    assert '"msg": "scored"' in stderr and '"samples": 1' in stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--backend", "hf-classifier", "--model", "/nonexistent"), "/nonexistent"),
        (("--backend", "nope"), "invalid choice: 'nope'"),
        (("--backend", "hf-classifier"), "needs --model"),
    ],
)
def test_process_refuses_to_start(argv: tuple[str, ...], expected: str) -> None:
    done = subprocess.run(
        rlhf_command(*argv, "--host", "127.0.0.1", "--port", "0"),
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr
    if "/nonexistent" in argv:
        assert "does not exist" in done.stderr
