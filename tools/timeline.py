"""Where a run's time went: per-step phase seconds, how much rollout overlapped training, and
the step timeline (generate and score vs train and sync) as a plot panel.

Reads the metrics rows the loop writes (metrics.jsonl). Rows of runs from before the overlap
(no `time/overlap`, no `timeline/*` fields) still render: overlap and staleness show as "-" and
the timeline panel says it has nothing to draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib loads only when a plot is drawn
    from matplotlib.axes import Axes

OVERLAP = "time/overlap"
"""Seconds of a step's rollout (generate + score) that ran while the trainer trained."""
STALENESS = "rollout/staleness"
"""Learner's weight version when training on a step's samples minus the version that made them."""
PHASE_SECONDS = {
    "generate": ("time/generate",),
    "score": ("time/score",),
    "train": ("time/ref_values", "time/update"),  # prepare (forward passes) + the PPO update
    "sync": ("time/weight_sync",),
}
"""Each phase of a step and the duration fields (seconds) it sums."""
TIMELINE_PREFIX = "timeline/"
"""A phase's interval is timeline/<phase>_start .. timeline/<phase>_end, Unix seconds."""
ROLLOUT_PHASES = ("generate", "score")
"""Phases on the rollout side (policy and reward services)."""
TRAINER_PHASES = ("train", "sync")
"""Phases on the trainer side."""
PHASE_COLORS = {
    "generate": "tab:blue",
    "score": "tab:orange",
    "train": "tab:green",
    "sync": "tab:red",
}
MAX_LABELLED_STEPS = 30
"""Above this many steps the timeline's bars carry no step numbers (they would overprint)."""
MISSING = "-"
"""How a table cell shows a field the row does not have."""


def phase_seconds(row: dict[str, float], phase: str) -> float | None:
    """Seconds `row`'s step spent in `phase`; None when the row lacks any of its fields."""
    keys = PHASE_SECONDS[phase]
    if not all(k in row for k in keys):
        return None
    return sum(float(row[k]) for k in keys)


def interval(row: dict[str, float], phase: str) -> tuple[float, float] | None:
    """(start, end) Unix seconds of `row`'s `phase`; None when the row does not record it."""
    start, end = f"{TIMELINE_PREFIX}{phase}_start", f"{TIMELINE_PREFIX}{phase}_end"
    if start not in row or end not in row:
        return None
    return float(row[start]), float(row[end])


def _cell(value: float | None, width: int, spec: str = ".1f") -> str:
    return f"{MISSING:>{width}}" if value is None else f"{value:>{width}{spec}}"


def phase_table(rows: Sequence[dict[str, float]]) -> list[str]:
    """Per step: seconds of each phase, of rollout that overlapped training, the samples'
    staleness and the step's own seconds; then the totals."""
    phases = list(PHASE_SECONDS)
    lines = [
        f"{'step':>4} "
        + " ".join(f"{p + '_s':>10}" for p in phases)
        + f" {'overlap_s':>9} {'stale':>5} {'step_s':>6}"
    ]
    for r in rows:
        stale = r.get(STALENESS)
        lines.append(
            f"{int(r['step']):>4} "
            + " ".join(_cell(phase_seconds(r, p), 10, ".2f") for p in phases)
            + f" {_cell(r.get(OVERLAP), 9, '.2f')} {_cell(stale, 5, '.0f')}"
            + f" {_cell(r.get('time/step'), 6)}"
        )
    return lines + [""] + totals(rows)


def totals(rows: Sequence[dict[str, float]]) -> list[str]:
    """The whole run: seconds per phase and their sum, the seconds saved by overlap (rollout
    that ran under training instead of after it) and the span from the first step's start to
    the last step's end."""
    sums = {p: sum(phase_seconds(r, p) or 0.0 for r in rows) for p in PHASE_SECONDS}
    total = sum(sums.values())
    parts = ", ".join(f"{p} {s:.1f}" for p, s in sums.items())
    lines = [f"seconds in phases: {parts}; sum {total:.1f} s"]
    overlaps = [float(r[OVERLAP]) for r in rows if OVERLAP in r]
    if overlaps:
        lines.append(f"saved by overlap: {sum(overlaps):.1f} s of rollout ran under training")
    else:
        lines.append(f"saved by overlap: {MISSING} (these metrics do not record it)")
    span = timeline_span(rows)
    if span is not None:
        lines.append(
            f"steps' span (step {int(rows[0]['step'])} start to step {int(rows[-1]['step'])} "
            f"end): {span[1] - span[0]:.1f} s"
        )
    return lines


def timeline_span(rows: Sequence[dict[str, float]]) -> tuple[float, float] | None:
    """(earliest start, latest end) of every recorded phase interval; None when none is."""
    found = [iv for r in rows for p in PHASE_SECONDS if (iv := interval(r, p)) is not None]
    if not found:
        return None
    return min(s for s, _ in found), max(e for _, e in found)


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by the union of `intervals` (overlapping ones count once)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def draw_timeline(ax: Axes, rows: Sequence[dict[str, float]]) -> None:
    """Two lanes on one time axis (seconds since the first step's start): the rollout's
    generate and score bars above, the trainer's train and sync bars below, so generation of
    step t+1 shows right above step t's update. Consecutive steps alternate between the upper
    and lower half of a lane, so their bars stay apart even when they touch in time."""
    from matplotlib.patches import Patch

    span = timeline_span(rows)
    if span is None:
        ax.text(0.5, 0.5, "no step timeline in these metrics", ha="center", va="center")
        ax.set_axis_off()
        return
    origin = span[0]
    lanes = {**{p: 1.0 for p in ROLLOUT_PHASES}, **{p: 0.0 for p in TRAINER_PHASES}}
    bars: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in rows:
        for phase in PHASE_SECONDS:
            iv = interval(r, phase)
            if iv is not None:
                bars.setdefault((phase, int(r["step"]) % 2), []).append(
                    (iv[0] - origin, iv[1] - iv[0])
                )
    for (phase, parity), spans in bars.items():
        y = lanes[phase] + (0.02 if parity else -0.38)
        ax.broken_barh(spans, (y, 0.36), facecolors=PHASE_COLORS[phase], edgecolor="none")
    if len(rows) <= MAX_LABELLED_STEPS:
        _label_steps(ax, rows, origin)
    width = span[1] - span[0]
    busy = {
        side: busy_seconds([iv for r in rows for p in phases if (iv := interval(r, p))]) / width
        for side, phases in (("trainer", TRAINER_PHASES), ("rollout", ROLLOUT_PHASES))
    }
    ax.set_yticks(
        [0.0, 1.0],
        [
            f"trainer\n(train, sync)\nbusy {busy['trainer']:.0%}",
            f"rollout\n(generate, score)\nbusy {busy['rollout']:.0%}",
        ],
    )
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlim(0.0, (span[1] - origin) * 1.01)
    ax.set_xlabel("seconds since the first step's start")
    ax.set_title("step timeline", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=p) for p, c in PHASE_COLORS.items()]
    ax.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, frameon=False)


def _label_steps(ax: Axes, rows: Sequence[dict[str, float]], origin: float) -> None:
    """Each step's number at the start of its generate bar and of its train bar."""
    for r in rows:
        step = int(r["step"])
        for phase, lane in (("generate", 1.0), ("train", 0.0)):
            iv = interval(r, phase)
            if iv is None:
                continue
            y = lane + (0.2 if step % 2 else -0.2)
            ax.text(iv[0] - origin, y, str(step), fontsize=6, va="center", ha="left")
