"""Which Python runs a policy service: its engine decides (tools.launch.engine_python), and
the policy service refuses an engine it cannot run with a clear message."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tools import launch


def test_flag_reads_both_spellings_and_the_last_wins() -> None:
    assert launch._flag(["policy", "serve", "--engine", "vllm"], "--engine") == "vllm"
    assert launch._flag(["--engine=vllm", "--engine", "hf"], "--engine") == "hf"
    assert launch._flag(["policy", "serve"], "--engine") is None


def test_hf_runs_here_and_vllm_from_its_venv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert launch.engine_python("hf") == sys.executable
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    monkeypatch.setattr(launch, "VLLM_VENV", venv)
    assert launch.engine_python("vllm") == str(venv / "bin" / "python")


def test_vllm_without_its_venv_or_the_package_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(launch, "VLLM_VENV", tmp_path / "missing")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="make install"):
        launch.engine_python("vllm")


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM installed"
)
def test_policy_service_without_vllm_says_how_to_get_it(tmp_path: Path) -> None:
    """`rlhf policy serve --engine vllm` in an environment without vLLM: exit 2, one line."""
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "policy", "serve", "--engine", "vllm", "--no-auth"]
        + ["--port", "0", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "vLLM is not installed" in done.stderr and ".venv-vllm" in done.stderr


def test_unknown_engine_and_a_cpu_kv_cache_of_zero_are_refused() -> None:
    from services.policy.config import PolicyServiceConfig

    with pytest.raises(ValueError, match="engine must be one of hf, vllm"):
        PolicyServiceConfig(engine="tgi")
    with pytest.raises(ValueError, match="vllm_kv_cache_gib must be > 0 on the CPU"):
        PolicyServiceConfig(engine="vllm", vllm_kv_cache_gib=0)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        PolicyServiceConfig(engine="vllm", device="cuda:1")
