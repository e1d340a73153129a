"""The benchmarks run: `bench/run_all.py --quick` on tiny models, end to end.

Speed is not judged here (timed tests on a shared machine prove nothing; `make bench` prints
the ratios). What is checked is that every benchmark still starts its services, compares the
same work on both sides (the same sampled tokens; the same scores, which bench_reward checks
itself; as many tokens on the policy service's hf and vllm engines; the same first-step
statistics from packed and padded PPO steps) and prints its table, so a change to a service or
a client cannot quietly break them.

bench_seed.py is left to tests/test_bench_seed.py, which runs the same smoke and checks more of
it; running it here too cost the suite a minute for nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_BENCH = "bench_seed.py"


def run_bench(script: str, *args: str, timeout: float) -> str:
    """bench/<script> with `args` run to its end; its stdout (its failure fails the test)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    return out


def assert_packing_statistics_agree(out: str) -> None:
    """bench_packing's two sides stepped on the same sampled rollouts, to the same statistics."""
    packing = re.search(r"statistics, largest relative difference: (\S+) ", out)
    assert packing and float(packing[1]) < 1e-4, out[-3000:]
    assert "speed packed / padded: median" in out


@pytest.mark.slow
def test_every_benchmark_runs_and_prints_its_table() -> None:
    out = run_bench("run_all.py", "--quick", "--skip", SEED_BENCH, timeout=600)
    summary = out.split("=== summary ===")[1]
    names = ("bench_loop.py", "bench_packing.py", "bench_policy.py", "bench_ranks.py")
    names += ("bench_replicas.py",)
    for name in (*names, "bench_reward.py"):
        assert name in summary and "FAILED" not in summary, summary
    assert SEED_BENCH not in summary
    assert "the same on both sides: yes" in out  # Generate sampled the in-process tokens
    assert "UpdateWeights MB/s" in out
    # bench_replicas: 1 vs 2 policy replicas made the same number of tokens.
    assert "tokens per Generate: 128 on both sides: yes" in out
    assert "Generate tok/s ratio, 2 replicas / 1" in out and "push time ratio" in out
    # bench_ranks: 2 DDP ranks did the single process's math on the same rollouts.
    assert "first step's statistics the same on both sides: yes" in out
    assert "speed 2 ranks / 1 rank: median" in out
    assert_packing_statistics_agree(out)
    # bench_policy's engine comparison: min = max new tokens, so each engine made exactly these.
    counts = "batch 8: hf [512], vllm [512]; batch 64: hf [4096], vllm [4096]"
    assert f"tokens per call ({counts}): the same on both engines: yes" in out, out[-3000:]
    assert "UpdateWeights s, client (until served)" in out
    rows = [line for line in out.splitlines() if line.startswith(("seed-length", "short"))]
    assert len(rows) == 8, out  # 2 text sizes x 2 call sizes x 2 client modes
    assert sum(line.rstrip().endswith("met") for line in rows) == 2  # the target rows say so


@pytest.mark.slow
def test_bench_packing_runs_make_runs_settings() -> None:
    """bench_packing's --settings make-run (configs/default.yaml: LoRA, the chat template), which
    run_all's smoke leaves out; the seed's settings run there."""
    args = ("--quick", "--settings", "make-run", "--rounds", "2")
    out = run_bench("bench_packing.py", *args, timeout=300)
    assert_packing_statistics_agree(out)
    assert "(rounds" in out
