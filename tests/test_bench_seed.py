"""bench/bench_seed.py: TRL 0.11.4's seed loop against the three services.

The smoke run (`--quick`: the tiny model on both sides, 1 round of 1 measured step) checks that
both sides ran the same work (the same number of episodes) and that the report has its fields;
no speed is judged (timed tests on a shared machine prove nothing). It took 31-80 s beside other
jobs on the 2-core machine (the TRL venv already prepared): slow. The report's arithmetic is
checked on made-up rows, fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import seed_report
from bench.measure import peak_memory_mib
from bench.project_side import round_seconds

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
    assert results["floor"]["flops"] > 0 and results["floor"]["matmul_gflops"] > 0


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
