"""The end-of-run summary's plot: one reward line per distinct series, the run id, a PNG."""

from __future__ import annotations

from pathlib import Path

from tools.report import reward_lines, summarize


def _rows(steps: int, **sources: float) -> list[dict[str, float]]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "weight_version": step, "objective/kl": 0.5 * step}
        row.update({f"env/reward/{name}": weight * step for name, weight in sources.items()})
        row["env/reward_mean"] = sum(row[f"env/reward/{n}"] for n in sources)
        rows.append(row)
    return rows


def test_one_source_of_weight_one_is_the_mean_line_only() -> None:
    lines = reward_lines(_rows(3, vader=1.0))
    assert [label for label, _, _ in lines] == ["mean reward (vader)"]


def test_several_sources_each_get_a_line() -> None:
    lines = reward_lines(_rows(3, rm=1.0, length=0.2))
    assert [label for label, _, _ in lines] == ["mean reward (weighted sum)", "length", "rm"]
    assert lines[2][1] == [1.0, 2.0, 3.0]


def test_summary_writes_the_plot_in_the_run_folder(tmp_path: Path) -> None:
    plot = tmp_path / "run-7" / "summary.png"
    text = summarize(_rows(4, vader=1.0), plot, elapsed_s=60.0)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean reward, first 3 steps: +2.0000" in text
