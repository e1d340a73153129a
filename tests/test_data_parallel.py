"""The data-parallel trainer (torch.distributed, 2 ranks on gloo, the tiny model): DDP and FSDP
give the single process's statistics and parameters for the same global batch and seed; an FSDP
resume from per-rank shards is exact; and `torchrun ... rlhf train` runs a whole PPO run against
real policy and reward services, rank 0 alone talking to them, with the single process's
metrics, and resumes from its checkpoint as if never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.orchestrator.learner_group import shard_root
from services.trainer.orchestrator.metrics import read_metrics, row_stats
from tests.servers import NO_AUTH_FLAG
from tools.launch import ServiceProcess, start_service

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STAT_RTOL, STAT_ATOL = 1e-4, 1e-6
"""Statistics of N ranks against one process: the same math on rows padded to other widths
(each rank pads only its own rows) rounds differently in float32, nothing more."""
PARAM_ATOL = 1e-5
"""Parameters after a few Adam steps at lr 1e-3: the same rounding, carried through."""


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args]


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{command} failed:\n{done.stderr[-3000:]}"


def close(a: float, b: float) -> bool:
    return abs(a - b) <= STAT_ATOL + STAT_RTOL * abs(a)


def assert_same_stats(one: list[dict[str, float]], many: list[dict[str, float]]) -> None:
    assert len(one) == len(many)
    for step, (a, b) in enumerate(zip(one, many, strict=True), 1):
        # Versions count the pushes the shared policy service took, run after run.
        keys = [
            k for k in a if not k.startswith(("time/", "timeline/")) and "weight_version" not in k
        ]
        assert keys and set(keys) <= set(b), f"step {step}: stats differ in names"
        off = {k: (a[k], b[k]) for k in keys if not close(a[k], b[k])}
        assert not off, f"step {step}: {off}"


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= PARAM_ATOL, worst


# --- the learner alone: fixed rollouts, 3 steps ------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(tiny_lm: Path, tmp_path: Path, strategy: str) -> None:
    script = str(ROOT / "tests" / "dp_steps.py")
    run([sys.executable, script, str(tiny_lm), str(tmp_path / "one")], tmp_path / "one.log")
    many = tmp_path / strategy
    run(torchrun(script, str(tiny_lm), str(many), "--strategy", strategy), tmp_path / "2.log")
    one = json.loads((tmp_path / "one" / "stats.json").read_text())
    assert_same_stats(one, json.loads((many / "stats.json").read_text()))
    assert_same_params(
        load_file(tmp_path / "one" / "weights.safetensors"), load_file(many / "weights.safetensors")
    )
    # The training moved the weights: equal because both trained, not because neither did.
    assert one[0]["ppo/loss/total"] != one[-1]["ppo/loss/total"]


def test_an_fsdp_resume_from_shards_is_exact(tiny_lm: Path, tmp_path: Path) -> None:
    script = str(ROOT / "tests" / "dp_steps.py")
    flags = ("--strategy", "fsdp")
    run(torchrun(script, str(tiny_lm), str(tmp_path / "straight"), *flags), tmp_path / "a.log")
    resumed = tmp_path / "resumed"
    run(torchrun(script, str(tiny_lm), str(resumed), *flags, "--resume-at", "2"), tmp_path / "b")
    straight = load_file(tmp_path / "straight" / "weights.safetensors")
    again = load_file(resumed / "weights.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


# --- a whole run: `torchrun ... rlhf train` against the services --------------------------------
@pytest.fixture(scope="module")
def services(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    logs = tmp_path_factory.mktemp("dp-services")
    policy = start_service(
        "policy", ["policy", "serve", "--model", str(tiny_lm), NO_AUTH_FLAG], logs
    )
    started: list[ServiceProcess] = [policy]
    try:
        started.append(start_service("reward", ["reward", "serve"], logs))
        yield [f"--policy={policy.address}", f"--reward={started[1].address}"]
    finally:
        for service in started:
            service.stop()


def train(tiny_lm: Path, out: Path, run_id: str, steps: int, *extra: str) -> list[str]:
    sets = [
        f"ppo.model_name={tiny_lm}",
        "batch_size=4",
        "mini_batch_size=2",
        "ppo_epochs=2",
        "learning_rate=1e-3",
        "log_with=jsonl",
        "max_new_tokens=6",
        f"run.steps={steps}",
        "run.save_every=2",
        f"run.output_dir={out}",
    ]
    flags = [arg for item in sets for arg in ("--set", item)]
    return ["-m", "rlhf.cli", "train", "--run-id", run_id, *flags, *extra]


def metrics(out: Path, run_id: str) -> list[dict[str, float]]:
    return [row_stats(row) for row in read_metrics(out / run_id / "metrics.jsonl")]


def policy_weights(out: Path, run_id: str, step: int) -> dict[str, torch.Tensor]:
    folder = out / run_id / "checkpoints" / f"step-{step:06d}" / "policy"
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_run_on_two_ranks_matches_one_and_resumes(
    tiny_lm: Path, tmp_path: Path, services: list[str], strategy: str
) -> None:
    out = tmp_path / "runs"
    run([sys.executable, *train(tiny_lm, out, "one", 4, *services)], tmp_path / "one.log")
    dp = ("--data-parallel", strategy)
    run(torchrun(*train(tiny_lm, out, "two", 4, *services, *dp)), tmp_path / "two.log")
    assert_same_stats(metrics(out, "one"), metrics(out, "two"))
    assert_same_params(policy_weights(out, "one", 4), policy_weights(out, "two", 4))

    # Two steps, stopped; resumed for two more: the same run as the uninterrupted one.
    run(torchrun(*train(tiny_lm, out, "cut", 2, *services, *dp)), tmp_path / "cut.log")
    if strategy == "fsdp":  # rank 1 wrote its shard of the checkpoint beside rank 0's
        assert (shard_root(out / "cut", 1) / "step-000002" / "trainer_state.json").is_file()
    resume = train(tiny_lm, out, "cut", 4, *services, *dp, "--resume")
    run(torchrun(*resume), tmp_path / "resume.log")
    assert_same_stats(metrics(out, "two"), metrics(out, "cut"))
    cut, two = policy_weights(out, "cut", 4), policy_weights(out, "two", 4)
    assert all(torch.equal(cut[k], two[k]) for k in two)
