"""The end-of-run summary: one reward line per distinct series, the run id, a PNG; seconds per
phase, overlap and the step timeline, from rows with and without the overlap's fields."""

from __future__ import annotations

from pathlib import Path

from tools.report import reward_lines, summarize
from tools.timeline import busy_seconds, draw_timeline, interval, phase_seconds


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


# --- seconds per phase and the step timeline -----------------------------------------------------
T0 = 1.7e9
"""Unix time of the first step's start in the synthetic rows."""


def _timed_rows(steps: int, overlapped: bool) -> list[dict[str, float]]:
    """Rows with every phase field: generate 3 s, score 1 s, train 2 + 6 s, sync 1 s. Overlapped
    (staleness 1): step t+1's rollout starts with step t's training; else lock-step."""
    rows, start = [], T0
    for step in range(1, steps + 1):
        train = max(start + 4.0, rows[-1]["timeline/sync_end"] if rows else 0.0)
        row = {"step": step, "weight_version": step, "env/reward_mean": 0.1 * step}
        row.update({"time/generate": 3.0, "time/score": 1.0, "time/ref_values": 2.0})
        row.update({"time/update": 6.0, "time/weight_sync": 1.0, "time/step": 13.0})
        for phase, begin, end in (
            ("generate", start, start + 3.0),
            ("score", start + 3.0, start + 4.0),
            ("train", train, train + 8.0),
            ("sync", train + 8.0, train + 9.0),
        ):
            row[f"timeline/{phase}_start"], row[f"timeline/{phase}_end"] = begin, end
        stale = overlapped and step > 1
        row.update({"time/overlap": 4.0 if stale else 0.0, "rollout/staleness": float(stale)})
        row["rollout/weight_version"] = float(step - 1 - stale)
        rows.append(row)
        start = train if overlapped else train + 9.0
    return rows


def test_phase_table_with_the_overlap_fields(tmp_path: Path) -> None:
    rows = _timed_rows(3, overlapped=True)
    text = summarize(rows, tmp_path / "summary.png", elapsed_s=60.0)
    assert "step generate_s    score_s    train_s     sync_s overlap_s stale step_s" in text
    assert "   2       3.00       1.00       8.00       1.00      4.00     1   13.0" in text
    assert "seconds in phases: generate 9.0, score 3.0, train 24.0, sync 3.0; sum 39.0 s" in text
    assert "saved by overlap: 8.0 s of rollout ran under training" in text
    # Step 1: 0..13 s; steps 2 and 3 each start with the previous step's training (+4 s, +13 s).
    assert "steps' span (step 1 start to step 3 end): 31.0 s" in text


def test_phase_table_of_rows_without_the_new_fields(tmp_path: Path) -> None:
    rows = _timed_rows(2, overlapped=False)
    for row in rows:
        for key in [k for k in row if k.startswith(("timeline/", "rollout/", "time/overlap"))]:
            del row[key]
    del rows[1]["time/weight_sync"]  # a phase a row does not record shows as "-" too
    text = summarize(rows, tmp_path / "summary.png", elapsed_s=60.0)
    assert "   1       3.00       1.00       8.00       1.00         -     -   13.0" in text
    assert "   2       3.00       1.00       8.00          -         -     -   13.0" in text
    assert "saved by overlap: - (these metrics do not record it)" in text
    assert "steps' span" not in text
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_phase_seconds_and_intervals() -> None:
    (row,) = _timed_rows(1, overlapped=False)
    assert phase_seconds(row, "train") == 8.0  # prepare (ref_values) + update
    assert interval(row, "sync") == (T0 + 12.0, T0 + 13.0)
    assert phase_seconds({"time/update": 1.0}, "train") is None
    assert interval({"timeline/sync_start": 1.0}, "sync") is None


def test_busy_seconds_count_overlapping_intervals_once() -> None:
    assert busy_seconds([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (2.5, 2.6)]) == 5.0
    assert busy_seconds([]) == 0.0


def test_timeline_draws_each_phase_on_its_lane_from_the_first_start() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw_timeline(ax, _timed_rows(2, overlapped=True))
    # One collection per (phase, odd/even step); each bar is a rectangle path from x0 to x0+w.
    bars = {}
    for collection in ax.collections:
        for path in collection.get_paths():
            xs, ys = path.vertices[:, 0], path.vertices[:, 1]
            bars[(round(xs.min(), 6), round(xs.max(), 6))] = round(ys.min(), 2)
    plt.close(fig)
    assert len(bars) == 8, bars
    assert bars[(0.0, 3.0)] > 0.5  # step 1 generates on the rollout lane, from 0 s
    assert bars[(4.0, 12.0)] < 0.5  # step 1 trains on the trainer lane
    assert bars[(4.0, 7.0)] > 0.5  # ... while step 2 generates above it


def test_summary_plot_of_200_steps(tmp_path: Path) -> None:
    plot = tmp_path / "summary.png"
    summarize(_timed_rows(200, overlapped=True), plot, elapsed_s=3000.0)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
