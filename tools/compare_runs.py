"""Runs side by side: their reward and KL curves in one PNG, and a table of first-3 / last-3
mean reward, final KL and seconds per step, e.g. bf16 next to fp32, staleness 1 next to 0.

    python -m tools.compare_runs runs/fp32 runs/bf16 --output runs/fp32-vs-bf16.png

Each argument is a run folder (<output_dir>/<run_id>/ with its metrics.jsonl); its label is the
folder's name unless --labels names them. The table's precision and staleness columns come from
the run's run.json (its config as the trainer ran it), "-" where the trainer did not record them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.report import EDGE_STEPS, KL_LABEL, first_last_means
from tools.timeline import MISSING


@dataclass
class RunCurves:
    """One run's metrics rows and what its run.json says about its settings."""

    label: str
    rows: list[dict[str, float]]
    config: dict[str, Any]
    """The run's config in run.json form ({} when the folder has no run.json)."""


def load_run(folder: Path, label: str = "") -> RunCurves:
    """A run folder's rows and config. Raises ValueError for a folder without metrics rows."""
    from services.trainer.api.records import METRICS, RECORD
    from services.trainer.orchestrator.metrics import read_metrics

    path = folder / METRICS
    if not path.is_file():
        raise ValueError(f"{folder} has no {METRICS}: not a run folder")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} holds no step rows")
    record = folder / RECORD
    # json.loads, not records.read_record: a comparison needs only the config, and a run.json
    # from another trainer version should not stop it.
    config: dict[str, Any] = {}
    if record.is_file():
        try:
            config = json.loads(record.read_text()).get("config", {})
        except ValueError as err:
            raise ValueError(f"{record} is not JSON: {err}") from None
    return RunCurves(label or folder.name, rows, config)


def seconds_per_step(rows: Sequence[dict[str, float]]) -> float:
    """Wall seconds between finished steps (the row's "time"), the first step excluded: it
    carries loading and warm-up; with one row, that step's time/step."""
    if len(rows) < 2:
        return float(rows[0].get("time/step", float("nan")))
    return (rows[-1]["time"] - rows[0]["time"]) / (len(rows) - 1)


def table(runs: Sequence[RunCurves]) -> str:
    """One line per run: steps, precision, staleness, first-3 and last-3 mean reward, final KL
    and seconds per step."""
    width = max(len("run"), *(len(r.label) for r in runs))
    lines = [
        f"{'run':<{width}} {'steps':>5} {'mixed_prec':>10} {'stale':>5} {'reward first':>12} "
        f"{'reward last':>11} {'final kl':>8} {'s/step':>6}"
    ]
    for run in runs:
        _, first, last = first_last_means(run.rows)
        precision = run.config.get("ppo", {}).get("mixed_precision", MISSING)
        staleness = run.config.get("run", {}).get("max_staleness", MISSING)
        kl = run.rows[-1].get("objective/kl", float("nan"))
        lines.append(
            f"{run.label:<{width}} {len(run.rows):>5} {precision:>10} {staleness!s:>5} "
            f"{first:>+12.4f} {last:>+11.4f} {kl:>8.3f} {seconds_per_step(run.rows):>6.1f}"
        )
    lines.append(
        f"reward first / last: mean reward of the first / last {EDGE_STEPS} steps; s/step: wall "
        "seconds between finished steps, the first step excluded"
    )
    return "\n".join(lines)


def plot(runs: Sequence[RunCurves], path: Path) -> None:
    """Mean reward per step on the left, KL per step on the right, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        steps = [int(r["step"]) for r in run.rows]
        ax_reward.plot(steps, [r["env/reward_mean"] for r in run.rows], label=run.label)
        kl = [r.get("objective/kl", float("nan")) for r in run.rows]
        ax_kl.plot(steps, kl, label=run.label)
    ax_reward.set_ylabel("mean reward")
    ax_kl.set_ylabel(KL_LABEL)
    for ax in (ax_reward, ax_kl):
        ax.set_xlabel("PPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.compare_runs",
        description="Reward and KL curves of two or more runs in one PNG, and a table.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders")
    parser.add_argument("--labels", nargs="+", default=[], help="one label per run folder")
    parser.add_argument("--output", type=Path, default=Path("compare.png"), help="the PNG")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give two or more run folders")
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"{len(args.labels)} labels for {len(args.runs)} run folders")
    labels = args.labels or [""] * len(args.runs)
    try:
        runs = [load_run(folder, label) for folder, label in zip(args.runs, labels)]
    except ValueError as err:
        print(f"compare_runs: {err}", file=sys.stderr)
        return 1
    plot(runs, args.output)
    print(table(runs))
    print(f"plot: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
