"""`rlhf policy serve` as a process: serving on --port 0, SIGTERM, bad configurations, and an
import-light --help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rlhf.clients import PolicyClient
from tests.policy.common import params
from tests.servers import NO_AUTH_FLAG

REPO = Path(__file__).resolve().parents[2]


def _serve(*flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", "policy", "serve", NO_AUTH_FLAG, *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_serves_and_stops_on_sigterm(tiny_lm: Path) -> None:
    proc = _serve(
        "--model", str(tiny_lm), "--host", "127.0.0.1", "--port", "0", "--grace-s", "2",
        "--threads", "1",
    )  # fmt: skip
    lines: list[str] = []
    port: list[int] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if '"listening"' in line and not port:
                port.append(int(json.loads(line)["address"].rsplit(":", 1)[1]))
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(60), "".join(lines)
        client = PolicyClient(f"127.0.0.1:{port[0]}")
        try:
            client.wait_ready(timeout_s=60)
            reply = client.generate(["hello"], params(max_new_tokens=3))
            assert reply.weight_version == 0 and len(reply.completions) == 1
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    messages = [json.loads(x)["msg"] for x in lines if x.startswith("{")]
    assert "model loaded" in messages and "serving" in messages and "stopped" in messages


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "float8"], "unknown dtype 'float8'; choose one of float32, bfloat16, float16"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "/nonexistent/policy-model"], "/nonexistent/policy-model does not exist"),
    ],
    ids=["dtype", "device", "missing model"],
)
def test_cli_refuses_bad_configuration(flags: list[str], message: str) -> None:
    proc = _serve("--host", "127.0.0.1", "--port", "0", *flags)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert message in stderr


def test_cli_is_import_light() -> None:
    code = (
        "import sys, services.policy.cli as c, rlhf.cli as r; r.build_parser();"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
