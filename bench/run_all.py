"""Runs every bench/bench_*.py in turn (`make bench`); exits non-zero if any of them fails.

Each benchmark runs in its own process, one after another (they measure throughput, so they
must not share the machine with each other), with its output passed through as it comes.

    python bench/run_all.py            # the full benchmarks, on the default models
    python bench/run_all.py --quick    # smoke runs: passes --quick to every benchmark
    python bench/run_all.py --quick --skip bench_seed.py   # all but the named ones
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark")
    parser.add_argument(
        "--skip", action="append", default=[], metavar="NAME", help="a bench_*.py not to run"
    )
    args = parser.parse_args(argv)
    every = sorted(BENCH.glob("bench_*.py"))
    unknown = set(args.skip) - {script.name for script in every}
    if unknown:
        print(f"--skip: no {', '.join(sorted(unknown))} in {BENCH}", file=sys.stderr)
        return 2
    scripts = [script for script in every if script.name not in args.skip]
    if not scripts:
        print(f"no bench_*.py to run in {BENCH}", file=sys.stderr)
        return 1
    results: list[tuple[str, int, float]] = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        started = time.monotonic()
        command = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        code = subprocess.run(command, check=False).returncode
        results.append((script.name, code, time.monotonic() - started))
    print("\n=== summary ===")
    for name, code, seconds in results:
        print(f"{name:<32} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {seconds:7.1f} s")
    return 1 if any(code for _, code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
