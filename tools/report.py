"""The end-of-run summary: a table of per-step statistics, a table of where each step's time
went (tools/timeline.py), and a PNG of reward and KL beside the step timeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tools.timeline import draw_timeline, phase_table

if TYPE_CHECKING:  # matplotlib loads only when a plot is drawn
    from matplotlib.axes import Axes

KL_LABEL = "KL(policy ‖ reference)\n[nats per response]"
"""objective/kl: the per-token KL summed over a response, averaged over the batch."""
MAX_MARKED_STEPS = 50
"""Above this many steps the mean reward's line has no per-step markers."""
EDGE_STEPS = 3
"""The summary compares the mean reward of the first and of the last this many steps."""


def summarize(
    rows: list[dict[str, float]], plot_path: Path, elapsed_s: float, run_id: str = ""
) -> str:
    """Writes the plot; returns the statistics table, the phase-time table and its totals, and
    the first-3 vs last-3 mean reward comparison. `run_id` titles the plot (default: the
    plot's folder, <output_dir>/<run_id>/)."""
    lines = [
        f"{'step':>4} {'version':>7} {'reward':>8} {'kl':>8} {'kl_coef':>8} "
        f"{'loss/policy':>11} {'loss/value':>10} {'resp_len':>8} {'step_s':>6}"
    ]
    for r in rows:
        lines.append(
            f"{int(r['step']):>4} {int(r['weight_version']):>7} {r['env/reward_mean']:>+8.4f} "
            f"{r.get('objective/kl', float('nan')):>8.4f} "
            f"{r.get('objective/kl_coef', float('nan')):>8.4f} "
            f"{r.get('ppo/loss/policy', float('nan')):>11.4f} "
            f"{r.get('ppo/loss/value', float('nan')):>10.4f} "
            f"{r.get('env/response_length', float('nan')):>8.1f} "
            f"{r.get('time/step', float('nan')):>6.1f}"
        )
    lines += ["", "seconds per phase (train = forward passes + update):", *phase_table(rows)]
    k, first, last = first_last_means(rows)
    lines.append("")
    lines.append(f"mean reward, first {k} steps: {first:+.4f}")
    lines.append(f"mean reward, last {k} steps:  {last:+.4f}   (change {last - first:+.4f})")
    lines.append(f"wall time: {elapsed_s / 60:.1f} min; plot: {plot_path}")
    _plot(rows, plot_path, run_id or plot_path.parent.name)
    return "\n".join(lines)


def first_last_means(rows: Sequence[dict[str, float]]) -> tuple[int, float, float]:
    """(k, mean reward of the first k steps, of the last k), k = EDGE_STEPS or fewer."""
    rewards = [r["env/reward_mean"] for r in rows]
    k = min(EDGE_STEPS, len(rewards))
    return k, sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def reward_lines(rows: list[dict[str, float]]) -> list[tuple[str, list[float], dict]]:
    """The reward plot's lines: (label, values per step, matplotlib style). The mean first,
    then one per reward source, except a source that is the mean itself (one source of weight
    1): it only names the mean's line."""
    mean = [r["env/reward_mean"] for r in rows]
    same: list[str] = []
    sources = []
    for key in sorted({k for r in rows for k in r if k.startswith("env/reward/")}):
        name = key.removeprefix("env/reward/")
        values = [r.get(key, float("nan")) for r in rows]
        if all(abs(v - m) <= 1e-9 for v, m in zip(values, mean)):
            same.append(name)
        else:
            sources.append((name, values, {"linestyle": "--"}))
    label = f"mean reward ({', '.join(same)})" if same else "mean reward (weighted sum)"
    return [(label, mean, {"marker": "o", "zorder": 3}), *sources]


def _plot(rows: list[dict[str, float]], path: Path, run_id: str) -> None:
    """Reward and KL per step on the left, the step timeline on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 6))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.0, 1.3))
    ax_reward = fig.add_subplot(grid[0, 0])
    ax_kl = fig.add_subplot(grid[1, 0], sharex=ax_reward)
    draw_reward_kl(ax_reward, ax_kl, rows)
    draw_timeline(fig.add_subplot(grid[:, 1]), rows)
    fig.suptitle(f"PPO: {run_id}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_reward_kl(ax_reward: Axes, ax_kl: Axes, rows: list[dict[str, float]]) -> None:
    """The reward lines (reward_lines) above, the KL below, per PPO step."""
    from matplotlib.ticker import MaxNLocator

    steps = [int(r["step"]) for r in rows]
    for label, values, style in reward_lines(rows):
        if len(steps) > MAX_MARKED_STEPS and "marker" in style:
            style = {**style, "marker": None}  # markers would merge into a thick band
        ax_reward.plot(steps, values, label=label, **style)
    ax_reward.set_ylabel("reward")
    ax_reward.legend(loc="best", fontsize=8)
    ax_reward.grid(alpha=0.3)
    ax_reward.tick_params(labelbottom=False)  # the KL panel below carries the step axis
    ax_kl.plot(steps, [r.get("objective/kl", float("nan")) for r in rows], color="tab:red")
    ax_kl.set_ylabel(KL_LABEL)
    ax_kl.set_xlabel("PPO step")
    ax_kl.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_kl.grid(alpha=0.3)
