"""The end-of-run summary: a table of per-step statistics and a PNG of reward and KL."""

from __future__ import annotations

from pathlib import Path


def summarize(
    rows: list[dict[str, float]], plot_path: Path, elapsed_s: float, run_id: str = ""
) -> str:
    """Writes the plot; returns the table and the first-3 vs last-3 mean reward comparison.
    `run_id` titles the plot (default: the plot's folder, <output_dir>/<run_id>/)."""
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
    rewards = [r["env/reward_mean"] for r in rows]
    k = min(3, len(rewards))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    lines.append("")
    lines.append(f"mean reward, first {k} steps: {first:+.4f}")
    lines.append(f"mean reward, last {k} steps:  {last:+.4f}   (change {last - first:+.4f})")
    lines.append(f"wall time: {elapsed_s / 60:.1f} min; plot: {plot_path}")
    _plot(rows, plot_path, run_id or plot_path.parent.name)
    return "\n".join(lines)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [int(r["step"]) for r in rows]
    fig, (ax_reward, ax_kl) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, values, style in reward_lines(rows):
        ax_reward.plot(steps, values, label=label, **style)
    ax_reward.set_ylabel("reward")
    ax_reward.legend(loc="best", fontsize=8)
    ax_reward.grid(alpha=0.3)
    # objective/kl: the per-token KL summed over a response, averaged over the batch.
    ax_kl.plot(steps, [r.get("objective/kl", float("nan")) for r in rows], color="tab:red")
    ax_kl.set_ylabel("KL(policy ‖ reference)\n[nats per response]")
    ax_kl.set_xlabel("PPO step")
    ax_kl.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_kl.grid(alpha=0.3)
    fig.suptitle(f"PPO: {run_id}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
