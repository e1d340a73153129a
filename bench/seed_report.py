"""bench_seed.py's results: each side's numbers from its measured steps' rows, the ratios against
TRL 0.11.4, the issue's targets, and the printed report.

Rows of the TRL side are trl_seed_loop.py's step lines; the project's are metrics.jsonl rows.
Both become the same phases per step: generate, score, update (the forward passes before the
PPO epochs included: TRL's `step`, the project's time/ref_values + time/update), sync (the
weight push; TRL has none) and overlap (rollout seconds that ran during an update).

Memory: each side's host peak (VmHWM, summed over its processes) always; on a GPU bench also its
GPU peak (nvidia-smi, summed over the processes that use the GPU), and then the memory ratios
and targets are the GPU's: that is the memory a GPU run runs out of.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.measure import speed_ratios
from bench.trl_seed_loop import BATCH_SIZE

TRL = "trl-0.11.4"
PHASES = ("generate", "score", "update", "sync", "overlap")
TARGETS = (
    # (what, the ratio's key, >= or <=, the bound)
    ("fp32 episodes/s / TRL's", "speed/fp32", ">=", 2.0),
    ("bf16 episodes/s / TRL's", "speed/bf16", ">=", 4.0),
    ("fp32 update / fp32 matmul floor", "floor/fp32", "<=", 1.5),
    ("fp32 peak memory / TRL's", "memory/fp32", "<=", 1.4),
    ("bf16 peak memory / TRL's", "memory/bf16", "<=", 1.4),
)
"""Issue #14's targets, each judged on the ratio of that key."""


def _phases(side: str, row: dict[str, Any]) -> dict[str, float]:
    """One step's seconds per phase, and its episodes and generated tokens."""
    if side == TRL:
        return {
            "generate": row["generate"],
            "score": row["score"],
            "update": row["step"],
            "sync": 0.0,
            "overlap": 0.0,
            "episodes": row["episodes"],
            "tokens": row["generated_tokens"],
        }
    return {
        "generate": row["time/generate"],
        "score": row["time/score"],
        "update": row["time/ref_values"] + row["time/update"],
        "sync": row["time/weight_sync"],
        "overlap": row.get("time/overlap", 0.0),  # absent before the overlap's change
        "episodes": BATCH_SIZE,
        "tokens": row["env/response_length"] * BATCH_SIZE,
    }


def side_result(
    side: str,
    rows: list[dict[str, Any]],
    seconds: list[float],
    memory: dict[str, float],
    floor_s: float,
    gpu_memory: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A side's numbers: `rows` its measured steps, `seconds` its rounds' seconds (the same
    number of steps in each), `memory` its processes' host peaks (MiB), `gpu_memory` (on a GPU
    bench) its GPU processes' peaks (MiB), or {"missing": why}."""
    steps = [_phases(side, row) for row in rows]
    per_round = sum(s["episodes"] for s in steps) / len(seconds)
    rates = [per_round / s for s in seconds]
    phases = {p: statistics.median(s[p] for s in steps) for p in PHASES}
    return {
        "steps": len(steps),
        "episodes": sum(s["episodes"] for s in steps),
        "episodes_per_s": statistics.median(rates),
        "episodes_per_s_range": [min(rates), max(rates)],
        "round_s": seconds,
        "phase_s_median": phases,
        "generated_tokens_per_s": sum(s["tokens"] for s in steps)
        / sum(s["generate"] for s in steps),
        # EOS may end a response early on both sides: longer responses are more work.
        "response_tokens_mean": sum(s["tokens"] for s in steps) / sum(s["episodes"] for s in steps),
        "update_floor_multiple": phases["update"] / floor_s,
        "peak_mib": sum(memory.values()),
        "peak_mib_per_process": memory,
        **_gpu(gpu_memory),
    }


def _gpu(gpu_memory: dict[str, Any] | None) -> dict[str, Any]:
    if gpu_memory is None:
        return {}
    if "missing" in gpu_memory:
        return {"gpu_peak_missing": gpu_memory["missing"]}
    return {"gpu_peak_mib": sum(gpu_memory.values()), "gpu_peak_mib_per_process": gpu_memory}


def results(
    setup: dict[str, Any],
    measured: dict[str, Any],
    floor: dict[str, Any],
    notes: list[str],
    steps: int,
) -> dict[str, Any]:
    """Everything the report prints, as plain data (bench_seed.py --json writes it)."""
    seconds, memory = measured["seconds"], measured["memory"]
    gpu = measured.get("gpu_memory")
    sides = {
        side: side_result(
            side, rows, seconds[side], memory[side], floor["seconds"], gpu and gpu[side]
        )
        for side, rows in measured["rows"].items()
    }
    # A GPU bench judges GPU memory; a side whose GPU peak is missing is not judged.
    peak_key = "peak_mib" if gpu is None else "gpu_peak_mib"
    ratios: dict[str, dict[str, float]] = {}
    for side in sides:
        if side == TRL:
            continue
        speed = speed_ratios(seconds[side], seconds[TRL])
        ratios[f"speed/{side}"] = {
            "value": statistics.median(speed),
            "min": min(speed),
            "max": max(speed),
        }
        ratios[f"floor/{side}"] = {"value": sides[side]["update_floor_multiple"]}
        if peak_key in sides[side] and peak_key in sides[TRL]:
            ratios[f"memory/{side}"] = {"value": sides[side][peak_key] / sides[TRL][peak_key]}
    return {
        "model": str(setup["model"]),
        "model_name": Path(setup["model"]).name,
        "rounds": len(seconds[TRL]),
        "steps_per_round": steps,
        "episodes_per_step": BATCH_SIZE,
        "notes": notes,
        "floor": floor,
        "memory": "gpu" if gpu is not None else "host",
        "sides": sides,
        "ratios": ratios,
        "targets": [_judge(ratios, target) for target in TARGETS],
    }


def _judge(ratios: dict[str, dict[str, float]], target: tuple) -> dict[str, Any]:
    what, key, op, bound = target
    if key not in ratios:
        return {"target": what, "bound": f"{op} {bound}", "value": None, "met": None}
    value = ratios[key]["value"]
    met = value >= bound if op == ">=" else value <= bound
    return {"target": what, "bound": f"{op} {bound}", "value": value, "met": met}


def _row(label: str, cells: list[str]) -> str:
    return f"{label:<34}" + "".join(f"{c:>16}" for c in cells)


def _processes(name: str, peaks: dict[str, float]) -> str:
    return f"{name}: " + ", ".join(f"{process} {mib:.0f}" for process, mib in peaks.items())


def _gpu_lines(names: list[str], sides: dict[str, Any], memory: str) -> list[str]:
    """The GPU peaks' rows, on a GPU bench; the memory ratios below are theirs."""
    if memory != "gpu":
        return []
    peaks = [sides[n].get("gpu_peak_mib") for n in names]
    lines = [
        _row("peak GPU memory MiB", ["-" if p is None else f"{p:.0f}" for p in peaks]),
        "  GPU memory per process (nvidia-smi, sampled every 0.5 s over the whole bench): "
        + "; ".join(
            _processes(n, sides[n]["gpu_peak_mib_per_process"])
            for n in names
            if "gpu_peak_mib" in sides[n]
        ),
    ]
    for name in names:
        if "gpu_peak_missing" in sides[name]:
            lines.append(f"  {name}: GPU memory not measured: {sides[name]['gpu_peak_missing']}")
    return lines


def _own_matmuls_lines(floor: dict[str, Any]) -> list[str]:
    """The replica update's own matmuls, replayed alone at their shapes (update_floor)."""
    own = floor.get("own_matmuls")
    if own is None:
        return []
    return [
        f"  its own {own['calls']} matmuls ({own['flops'] / 1e12:.3f} TFLOP), replayed alone at "
        f"their shapes on warm operands: {own['seconds']:.2f} s = "
        f"{own['seconds'] / floor['seconds']:.2f}x the floor (the least they take here)"
    ]


def render(results: dict[str, Any], targets: bool) -> str:
    """The printed report; `targets`: judge the issue's targets (not on a smoke run)."""
    sides, floor = results["sides"], results["floor"]
    names = list(sides)
    lines = [
        f"\nseed exercise, {results['model_name']}: {results['rounds']} round(s) ABBA x "
        f"{results['steps_per_round']} measured step(s) x {results['episodes_per_step']} "
        "episodes per side, warm-up step excluded",
        *(f"  {note}" for note in results["notes"]),
        "",
        _row("", names),
        _row("episodes measured", [str(sides[n]["episodes"]) for n in names]),
        _row("episodes/s (median of rounds)", [f"{sides[n]['episodes_per_s']:.3f}" for n in names]),
        _row(
            "  range over rounds",
            ["{:.3f}-{:.3f}".format(*sides[n]["episodes_per_s_range"]) for n in names],
        ),
    ]
    for phase in PHASES:
        cells = [f"{sides[n]['phase_s_median'][phase]:.3f}" for n in names]
        lines.append(_row(f"{phase} s/step (median)", cells))
    lines += [
        _row("generated tokens/s", [f"{sides[n]['generated_tokens_per_s']:.1f}" for n in names]),
        _row("response tokens (mean)", [f"{sides[n]['response_tokens_mean']:.1f}" for n in names]),
        _row("update / fp32 floor", [f"{sides[n]['update_floor_multiple']:.2f}x" for n in names]),
        _row("peak memory MiB", [f"{sides[n]['peak_mib']:.0f}" for n in names]),
        "  memory per process (VmHWM, MiB; the project's after its first run): "
        + "; ".join(_processes(n, sides[n]["peak_mib_per_process"]) for n in names),
        *_gpu_lines(names, sides, results["memory"]),
        f"fp32 matmul floor: {floor['flops'] / 1e12:.3f} TFLOP per update (replica step, "
        f"responses of {floor['response_tokens']} tokens) / {floor['matmul_gflops']:.0f} GFLOP/s "
        f"(fp32 matmul, {floor.get('device', 'cpu')}, {floor['threads']} thread(s)) "
        f"= {floor['seconds']:.2f} s",
        *_own_matmuls_lines(floor),
        "",
        f"ratios (speed: median of the rounds' ratios, range; memory: {results['memory']}):",
    ]
    for key, ratio in results["ratios"].items():
        spread = f" ({ratio['min']:.2f}-{ratio['max']:.2f})" if "min" in ratio else ""
        lines.append(f"  {key:<14} {ratio['value']:.3f}{spread}")
    if targets:
        lines.append("targets:")
        for t in results["targets"]:
            verdict = "not measured" if t["met"] is None else "met" if t["met"] else "not met"
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            lines.append(f"  {t['target']:<34} {value:>7} (target {t['bound']}): {verdict}")
    lines.append(f"wall time {results.get('wall_s', 0):.0f} s")
    return "\n".join(lines)
