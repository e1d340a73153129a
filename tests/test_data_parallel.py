"""The data-parallel trainer (torch.distributed, 2 ranks on gloo, the tiny model): DDP and FSDP
give the single process's statistics and parameters for the same global batch and seed (LoRA
too); `torchrun ... rlhf train` runs a whole PPO run against real policy and reward services,
rank 0 alone talking to them, with the single process's metrics, and resumes from its
checkpoint (FSDP: from every rank's shard) as if never stopped; and the trainer service runs on
two ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from rlhf.channels import check_health, open_channel
from services.trainer.orchestrator.learner_group import shard_root
from services.trainer.orchestrator.metrics import read_metrics, row_stats
from tests.servers import NO_AUTH_FLAG
from tests.test_trainer_loop import tiny_run
from tools.launch import ServiceProcess, free_port, start_service

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
LORA = ("--set", "use_lora=true", "--set", "lora_r=4", "--set", "lora_alpha=8")


DP_STEPS = str(ROOT / "tests" / "dp_steps.py")


@pytest.fixture(scope="module")
def one_process(
    tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[tuple[str, ...]], Path]:
    """The single process's outputs for some knobs, run once per knobs (DDP and FSDP share)."""
    done: dict[tuple[str, ...], Path] = {}

    def outputs(knobs: tuple[str, ...]) -> Path:
        if knobs not in done:
            alone = tmp_path_factory.mktemp("dp-one")
            run([sys.executable, DP_STEPS, str(tiny_lm), str(alone), *knobs], alone / "one.log")
            done[knobs] = alone
        return done[knobs]

    return outputs


@pytest.mark.parametrize(
    ("strategy", "knobs"), [("ddp", ()), ("fsdp", ()), ("fsdp", LORA)], ids=["ddp", "fsdp", "lora"]
)
def test_two_ranks_equal_one_process(
    tiny_lm: Path,
    tmp_path: Path,
    one_process: Callable[[tuple[str, ...]], Path],
    strategy: str,
    knobs: tuple[str, ...],
) -> None:
    alone = one_process(knobs)
    many = tmp_path / strategy
    run(torchrun(DP_STEPS, str(tiny_lm), str(many), "--strategy", strategy, *knobs), tmp_path / "2")
    one = json.loads((alone / "stats.json").read_text())
    assert_same_stats(one, json.loads((many / "stats.json").read_text()))
    for name in ("weights.safetensors", "servable.safetensors"):
        assert_same_params(load_file(alone / name), load_file(many / name))
    # The training moved the weights: equal because both trained, not because neither did.
    assert one[0]["ppo/loss/total"] != one[-1]["ppo/loss/total"]


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


def train(tiny_lm: Path, out: Path | None, run_id: str, steps: int, *extra: str) -> list[str]:
    """`rlhf train` of a short run (out None: in a trainer service's --output-dir)."""
    sets = [
        *tiny_run(tiny_lm),
        f"run.steps={steps}",
        "run.save_every=2",
        *([f"run.output_dir={out}"] if out else []),
    ]
    flags = [arg for item in sets for arg in ("--set", item)]
    return ["-m", "rlhf.cli", "train", "--run-id", run_id, *flags, *extra]


def metrics(out: Path, run_id: str) -> list[dict[str, float]]:
    return [row_stats(row) for row in read_metrics(out / run_id / "metrics.jsonl")]


def policy_weights(out: Path, run_id: str, step: int) -> dict[str, torch.Tensor]:
    folder = out / run_id / "checkpoints" / f"step-{step:06d}" / "policy"
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def one_process_run(
    tiny_lm: Path, services: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The runs folder of a 4-step run in one process ("one"), for the ranks to match."""
    out = tmp_path_factory.mktemp("dp-runs")
    run([sys.executable, *train(tiny_lm, out, "one", 4, *services)], out / "one.log")
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_run_on_two_ranks_stopped_and_resumed_matches_one_process(
    tiny_lm: Path, tmp_path: Path, services: list[str], one_process_run: Path, strategy: str
) -> None:
    """Two steps on two ranks, stopped; resumed on two ranks for two more: the single process's
    four steps, statistics and final weights. Steps 1-2 show the ranks do one process's math;
    steps 3-4 that the resume restored every rank (a rank left with its fresh model, optimiser
    or FSDP shard would move the averaged gradients far outside the tolerance). That a resume is
    exact bit for bit, test_trainer_loop.py's test_resumed_run_matches_an_uninterrupted_one shows
    on the same checkpoint code."""
    out = tmp_path / "runs"
    shutil.copytree(one_process_run / "one", out / "one")
    dp = ("--data-parallel", strategy)
    run(torchrun(*train(tiny_lm, out, "cut", 2, *services, *dp)), tmp_path / "cut.log")
    assert len(metrics(out, "cut")) == 2
    if strategy == "fsdp":  # rank 1 wrote its shard of the checkpoint beside rank 0's
        assert (shard_root(out / "cut", 1) / "step-000002" / "trainer_state.json").is_file()
    resume = train(tiny_lm, out, "cut", 4, *services, *dp, "--resume")
    run(torchrun(*resume), tmp_path / "resume.log")
    assert_same_stats(metrics(out, "one"), metrics(out, "cut"))
    assert_same_params(policy_weights(out, "one", 4), policy_weights(out, "cut", 4))


# --- the trainer service on two ranks -----------------------------------------------------------
def wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    with open_channel(address) as channel:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the trainer ranks exited before serving"
            try:
                if check_health(channel) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"no trainer serving at {address} after {timeout_s} s")


def test_the_trainer_service_on_two_ranks_runs_runs(
    tiny_lm: Path, tmp_path: Path, services: list[str]
) -> None:
    """Rank 0 serves the control API; runs one after another reach both ranks; a batch that does
        not split over the ranks is refused at StartRun, before anything loads; SIGTERM lets the run
    in progress finish."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    policy, reward = (flag.split("=", 1)[1] for flag in services)
    serve = torchrun(
        *("-m", "rlhf.cli", "trainer", "serve", "--host", "127.0.0.1", "--port", str(port)),
        *(NO_AUTH_FLAG, "--output-dir", str(tmp_path / "runs"), "--policy", policy),
        *("--reward", reward, "--model-root", str(tiny_lm.parent)),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "trainer.log").open("w")
    proc = subprocess.Popen(serve, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(address, proc)
        for run_id in ("first", "second"):
            command = train(tiny_lm, None, run_id, 2, "--trainer", address)
            run([sys.executable, *command], tmp_path / f"{run_id}.log")
            assert len(metrics(tmp_path / "runs", run_id)) == 2
        refused = subprocess.run(
            [
                sys.executable,
                *train(tiny_lm, None, "odd", 1, "--trainer", address),
                "--set",
                "batch_size=3",
                "--set",
                "mini_batch_size=1",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert refused.returncode == 1
        assert "batch_size (3) must be a multiple of the data-parallel world size (2)" in (
            refused.stderr
        ), refused.stderr
        # SIGTERM to torchrun while a run goes on: as in one process, the run finishes first
        # (the other ranks outlast the signal), then every rank leaves.
        steps = 40
        command = train(tiny_lm, None, "last", steps, "--trainer", address, "--detach")
        run([sys.executable, *command], tmp_path / "last.log")
        folder = tmp_path / "runs" / "last"
        while not (folder / "metrics.jsonl").is_file() or not metrics(tmp_path / "runs", "last"):
            time.sleep(0.1)
        proc.terminate()
        assert len(metrics(tmp_path / "runs", "last")) < steps  # the signal came mid-run
        assert proc.wait(timeout=120) != 0  # torchrun reports the signal it got
        assert json.loads((folder / "run.json").read_text())["state"] == "RUN_STATE_COMPLETED"
        assert len(metrics(tmp_path / "runs", "last")) == steps
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        log.close()
