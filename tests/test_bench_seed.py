"""bench/bench_seed.py: TRL 0.11.4's seed loop against the three services.

The smoke run (`--quick`: the tiny model on both sides, 1 round of 1 measured step) checks that
both sides ran the same work (the same number of episodes) and that the report has its fields;
no speed is judged (timed tests on a shared machine prove nothing). It took 31-80 s beside other
jobs on the 2-core machine (the TRL venv already prepared): slow. The report's arithmetic is
checked on made-up rows, fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench import bench_seed, seed_report, update_floor
from bench.measure import GpuMemoryPeaks, peak_memory_mib
from bench.project_side import round_seconds
from bench.update_floor import MatmulCall, MatmulRecorder, matmuls_seconds

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("--variants", "fp32,bf16-overlap")
"""Two of the project's stacks, which between them run every knob the variants turn (bf16,
overlap): each stack more costs the suite about 20 s."""
REPORT_LINES = (
    "episodes measured",
    "episodes/s (median of rounds)",
    "generate s/step",
    "score s/step",
    "update s/step",
    "sync s/step",
    "generated tokens/s",
    "response tokens (mean)",
    "update / fp32 floor",
    "peak memory MiB",
    "fp32 matmul floor:",
    "replayed alone at their shapes",
)


@pytest.mark.slow
def test_quick_run_does_the_same_work_on_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_seed.py"),
            "--quick",
            *VARIANTS,
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for label in REPORT_LINES:
        assert label in done.stdout, f"{label!r} missing:\n{done.stdout}"
    assert "targets:" not in done.stdout  # a smoke run judges none
    results = json.loads(out.read_text())
    sides = results["sides"]
    assert set(sides) == {"trl-0.11.4", "fp32", "bf16-overlap"}
    episodes = {name: side["episodes"] for name, side in sides.items()}
    assert set(episodes.values()) == {4}, episodes  # 1 step x batch 4 each, warm-up excluded
    for name, side in sides.items():
        assert side["episodes_per_s"] > 0 and side["generated_tokens_per_s"] > 0, name
        assert side["peak_mib"] > 100, name  # torch alone is more than this
    assert set(sides["fp32"]["peak_mib_per_process"]) == {"policy", "reward", "trainer"}
    floor = results["floor"]
    assert floor["flops"] > 0 and floor["matmul_gflops"] > 0
    own = floor["own_matmuls"]
    # The linear layers' matmuls are most of a step's FLOPs, never more than all of them.
    assert own["calls"] > 0 and 0.5 * floor["flops"] < own["flops"] <= floor["flops"], own
    assert own["seconds"] > 0, own


def _trl_row(seconds: float) -> dict[str, float]:
    return {"generate": 2.0, "score": 0.5, "step": seconds - 2.5, "episodes": 4,
            "generated_tokens": 200, "seconds": seconds}  # fmt: skip


def _project_row(step: int, at: float) -> dict[str, float]:
    return {"step": step, "time": at, "time/generate": 1.0, "time/score": 0.25,
            "time/ref_values": 0.5, "time/update": 1.5, "time/weight_sync": 0.25,
            "env/response_length": 40.0}  # fmt: skip


def test_results_ratios_and_targets_from_rows() -> None:
    measured = {
        "rows": {
            "trl-0.11.4": [_trl_row(10.0), _trl_row(10.0), _trl_row(8.0), _trl_row(8.0)],
            "fp32": [_project_row(2, 0.0), _project_row(3, 0.0)] * 2,
        },
        "seconds": {"trl-0.11.4": [20.0, 16.0], "fp32": [5.0, 8.0]},
        "memory": {"trl-0.11.4": {"trl": 1000.0}, "fp32": {"policy": 500.0, "trainer": 900.0}},
    }
    floor = {"seconds": 1.0, "flops": 1e12, "response_tokens": 40, "matmul_gflops": 1000.0,
             "threads": 1}  # fmt: skip
    results = seed_report.results({"model": "m"}, measured, floor, [], steps=2)
    trl, fp32 = results["sides"]["trl-0.11.4"], results["sides"]["fp32"]
    assert trl["episodes"] == fp32["episodes"] == 16
    assert trl["episodes_per_s_range"] == [8 / 20, 8 / 16]
    assert fp32["episodes_per_s"] == pytest.approx((8 / 5 + 8 / 8) / 2)
    assert fp32["phase_s_median"]["update"] == 2.0  # ref_values + update
    assert fp32["generated_tokens_per_s"] == pytest.approx(160.0)  # 40 x 4 tokens per second
    assert fp32["response_tokens_mean"] == 40.0 and trl["response_tokens_mean"] == 50.0
    assert fp32["update_floor_multiple"] == 2.0
    assert results["ratios"]["speed/fp32"] == {"value": 3.0, "min": 2.0, "max": 4.0}
    assert results["ratios"]["memory/fp32"]["value"] == pytest.approx(1.4)
    judged = {t["target"]: t["met"] for t in results["targets"]}
    assert judged["fp32 episodes/s / TRL's"] is True
    assert judged["fp32 update / fp32 matmul floor"] is False  # 2.0 > 1.5
    assert judged["fp32 peak memory / TRL's"] is True  # 1.4 <= 1.4
    assert judged["bf16 episodes/s / TRL's"] is None  # not measured
    report = seed_report.render(results, targets=True)
    assert "fp32 update / fp32 matmul floor" in report and ": not met" in report
    assert "bf16 episodes/s / TRL's" in report and "not measured" in report


def test_round_seconds_start_at_the_warm_up_row() -> None:
    rows = [{"step": 1, "time": 100.0}, {"step": 2, "time": 103.0}, {"step": 3, "time": 107.5}]
    assert round_seconds(rows) == 7.5
    with pytest.raises(ValueError, match="nothing after"):
        round_seconds(rows[:1])


def test_peak_memory_is_the_processs_high_water_mark() -> None:
    # A child that touches 200 MiB, frees it, then waits: its peak stays above 200 MiB.
    code = "b = b'x' * (200 << 20); del b; print('ready', flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert peak_memory_mib(child.pid) > 200
    finally:
        child.kill()
        child.wait()
    with pytest.raises(FileNotFoundError):
        peak_memory_mib(child.pid)  # reaped: no /proc entry


def test_gpu_results_judge_gpu_memory_and_say_which_side_was_not_seen() -> None:
    measured = {
        "rows": {
            "trl-0.11.4": [_trl_row(10.0)] * 2,
            "fp32": [_project_row(2, 0.0)] * 2,
            "bf16": [_project_row(2, 0.0)] * 2,
        },  # fmt: skip
        "seconds": {"trl-0.11.4": [20.0], "fp32": [5.0], "bf16": [5.0]},
        "memory": {
            "trl-0.11.4": {"trl": 1000.0},
            "fp32": {"trainer": 3000.0},
            "bf16": {"trainer": 3000.0},
        },  # fmt: skip
        "gpu_memory": {
            "trl-0.11.4": {"trl_seed_loop": 4000.0},
            "fp32": {"policy": 1000.0, "trainer": 4000.0},
            "bf16": {"missing": "nvidia-smi never listed trainer"},
        },
    }
    floor = {"seconds": 1.0, "flops": 1e12, "response_tokens": 40, "matmul_gflops": 1000.0,
             "threads": 1, "device": "cuda"}  # fmt: skip
    results = seed_report.results({"model": "m"}, measured, floor, [], steps=2)
    assert results["memory"] == "gpu"
    assert results["ratios"]["memory/fp32"]["value"] == pytest.approx(1.25)  # not host's 3.0
    assert "memory/bf16" not in results["ratios"]
    judged = {t["target"]: t["met"] for t in results["targets"]}
    assert judged["fp32 peak memory / TRL's"] is True
    assert judged["bf16 peak memory / TRL's"] is None  # not measured, not met
    report = seed_report.render(results, targets=True)
    assert "peak GPU memory MiB" in report
    assert "bf16: GPU memory not measured: nvidia-smi never listed trainer" in report


def _fake_nvidia_smi(folder: Path, script: str) -> str:
    """A PATH with an `nvidia-smi` that runs `script` (sh) first."""
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_gpu_peaks_keep_each_processs_highest_sample(tmp_path: Path, monkeypatch) -> None:
    # Each call prints the next line of samples.txt for pid 11; pid 12 stays at 5 MiB.
    (tmp_path / "samples.txt").write_text("100\n700\n300\n")
    count = tmp_path / "count"
    script = (
        # The count is replaced whole (mv), never truncated under the test's read of it.
        f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {count}.new; "
        f"mv {count}.new {count}\n"
        f'mib=$(sed -n "${{n}}p" {tmp_path / "samples.txt"}); echo "11, ${{mib:-300}}"\n'
        'echo "12, 5"\n'
    )
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, script))
    with GpuMemoryPeaks(interval=0.01) as gpu:
        while int(count.read_text()) < 5:
            time.sleep(0.01)
    assert gpu.error is None
    assert gpu.peaks_of({"trainer": 11, "policy": 12, "reward": 13}) == (
        {"trainer": 700.0, "policy": 5.0},
        ["reward"],
    )


def test_gpu_peaks_fail_before_the_bench_when_nvidia_smi_cannot_answer(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, "echo 'no devices' >&2; exit 9\n"))
    with pytest.raises(RuntimeError, match="nvidia-smi exited 9: no devices"):
        GpuMemoryPeaks().__enter__()
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, "echo 'No running processes'\n"))
    with pytest.raises(RuntimeError, match="not 'pid, MiB'"):
        GpuMemoryPeaks().__enter__()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_bench_on_a_machine_without_one_is_refused_before_it_starts(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        bench_seed._flags(["--device", "cuda"])
    assert stopped.value.code == 2
    assert "--device: device 'cuda' asked for, but this machine has no CUDA GPU" in (
        capsys.readouterr().err
    )


def test_generation_on_a_gpu_beside_trl_on_the_cpu_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_seed._flags(["--policy-device", "cuda"])
    assert "--policy-device on a GPU needs --device on one too" in capsys.readouterr().err


def test_the_recorder_counts_each_matmul_of_a_linear_layers_forward_and_backward() -> None:
    layer = torch.nn.Linear(8, 3, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    with MatmulRecorder() as recorder:
        layer(x).sum().backward()
    calls = recorder.calls
    # Forward x @ W^T (5x8 . 8x3), backward: grad_x = g @ W (5x3 . 3x8), grad_W = g^T @ x.
    assert sum(calls.values()) == 3, calls
    assert sorted(c.shapes for c in calls) == [
        ((3, 5), (5, 8)),
        ((5, 3), (3, 8)),
        ((5, 8), (8, 3)),
    ]
    assert {c.flops for c in calls} == {2 * 5 * 8 * 3}
    forward = next(c for c in calls if c.shapes == ((5, 8), (8, 3)))
    assert forward.strides == ((8, 1), (1, 8))  # W^T is a transposed view: kept as one
    assert [t.stride() for t in forward.operands()] == [(8, 1), (1, 8)]


def test_replayed_matmuls_cost_their_count_times_one_call(monkeypatch) -> None:
    """Each distinct call is timed once and counted as often as the step made it."""
    call = MatmulCall("mm", ((64, 64), (64, 64)), ((64, 1), (64, 1)), torch.float32, "cpu")
    # A clock that ticks once per reading: every replay reads it the same number of times.
    clock = iter(range(1_000_000))
    monkeypatch.setattr(update_floor.time, "perf_counter", lambda: float(next(clock)))
    one = matmuls_seconds(Counter({call: 1}), threads=1)
    assert one > 0
    clock = iter(range(1_000_000))
    assert matmuls_seconds(Counter({call: 7}), threads=1) == pytest.approx(7 * one)


def test_a_broadcast_bias_is_replayed_with_its_zero_stride() -> None:
    call = MatmulCall(
        "addmm", ((4, 3), (4, 8), (8, 3)), ((0, 1), (8, 1), (1, 8)), torch.float32, "cpu"
    )
    bias, mat1, mat2 = call.operands()
    assert bias.stride() == (0, 1) and mat2.stride() == (1, 8)
    assert torch.equal(bias[0], bias[3])  # one row, seen four times
    assert torch.ops.aten.addmm.default(bias, mat1, mat2).shape == (4, 3)
