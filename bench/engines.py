"""The policy service on its two engines side by side: hf (transformers' generate) and vllm.

What is measured, through the gRPC service, on each engine:
- Generate tokens/s at batch 8 and at batch 64, 64 new tokens per completion, with
  min_new_tokens = max_new_tokens so that both engines generate exactly as many tokens (their
  sampled tokens differ: each engine draws from its own random stream). The counts are checked.
- UpdateWeights: one full push of the model's state dict (tied tensors once, as the trainer sends
  it), version bumped each time: the seconds the service reports (UpdateWeightsResponse.seconds:
  receive + apply, which on vllm includes loading the version into vLLM's model) and the client's
  wall time, which ends when the pushed version serves (the reply comes after the swap; GetInfo
  then confirms the version).

How, and why:
- Each engine runs as `rlhf policy serve` in its own process, hf with this Python and vllm with
  tools.launch.engine_python("vllm"), never both at once: start one, measure, stop it, start
  the other. Two engines at once would share the cores and measure each other's load.
- A round starts each engine once; the order alternates over rounds (hf vllm, vllm hf, ...:
  bench.measure.alternate) so that load from other work hits both alike. Each start's first
  Generate (a warm-up) and first two pushes (the service double-buffers: each of its two receive
  buffers is touched once) are not measured. A round's ratio compares the two engines' runs of
  that round; the table gives each side's median round and range, and the ratios' median and
  range, and every round's ratio.
- Both services get the same --threads (default: every core) and --device and --dtype; nothing
  here is CPU-specific, so `--device cuda` measures the GPU builds the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.measure import alternate
from rlhf.config.flags import int_at_least
from rlhf.defaults import DEVICE_HELP, DTYPE_NAMES
from services.policy.config import ENGINES, PolicyServiceConfig

if TYPE_CHECKING:
    import torch

    from rlhf.clients import PolicyClient

NEW_TOKENS = 64
"""New tokens per completion, on both engines (min = max)."""
BATCHES = (8, 64)
"""Prompts per Generate call measured."""
WARM_UP_PUSHES = 2
"""Unmeasured pushes after each start: one per receive buffer of the service's double buffer."""
WARM_UP_TOKENS = 8
"""New tokens of each start's unmeasured first Generate (at the largest batch)."""
PROMPTS = [
    "Write a short poem about a robot.", "Explain KL divergence in simple terms.",
    "What are the stages of RLHF?", "Tell me about your favourite movie.",
    "Name three friendly animals.", "How do I bake bread?", "Why is the sky blue?",
    "Give me a fun fact about space.",
]  # fmt: skip
"""The prompts of every Generate of bench_policy, repeated to fill a batch."""


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The engine comparison's own flags (bench_policy's --model, --seed, --threads and --quick
    apply to it too)."""
    add = parser.add_argument
    add("--engines", action="store_true", help="run the engine comparison only (--only engines)")
    add(
        "--device",
        default=PolicyServiceConfig.device,
        help=f"engines: the services' device ({DEVICE_HELP})",
    )
    add(
        "--dtype",
        default=PolicyServiceConfig.dtype,
        choices=DTYPE_NAMES,
        help="engines: the services' dtype",
    )
    add(
        "--engine-rounds",
        type=int_at_least(1),
        default=4,
        help="engines: rounds (each starts both engines)",
    )
    add(
        "--update-pushes",
        type=int_at_least(1),
        default=3,
        help="engines: measured pushes per start",
    )
    add("--engine-logs", help="engines: keep the services' logs in this folder")


@dataclass
class EngineRun:
    """What one start of one engine measured."""

    start_s: float
    """Seconds from launching the process until its health said SERVING."""
    generate_s: dict[int, float] = field(default_factory=dict)
    """Seconds of the measured Generate call, per batch size."""
    tokens: dict[int, int] = field(default_factory=dict)
    """Tokens that call generated, per batch size."""
    update_service_s: float = 0.0
    """Median over the measured pushes of UpdateWeightsResponse.seconds (receive + apply)."""
    update_wall_s: float = 0.0
    """Median over the measured pushes of the client's UpdateWeights call, until it serves."""


def compare_engines(args: argparse.Namespace, model: str, work: Path) -> int:
    """Runs the rounds, prints the table; 1 if the engines generated different token counts."""
    import torch

    from services.policy.loading import load_causal_lm

    began = time.monotonic()
    threads = args.threads or len(os.sched_getaffinity(0))
    rounds = 1 if args.quick else args.engine_rounds
    pushes = 1 if args.quick else args.update_pushes
    dtype = getattr(torch, args.dtype)
    # The trainer's side of a push: the model's weights on this host, in the served dtype.
    tensors = sent_tensors(load_causal_lm(model, torch.device("cpu"), dtype).model)
    logs = Path(args.engine_logs) if args.engine_logs else work / "engine-logs"
    print(
        f"\nengine comparison: model {model}, device {args.device}, {args.dtype}, {threads} "
        f"torch thread(s) per service, {rounds} round(s) in ABBA order, {pushes} measured "
        f"push(es) per start; service logs in {logs}",
        flush=True,
    )
    runs: dict[str, list[EngineRun]] = {engine: [] for engine in ENGINES}
    flags = ["--device", args.device, "--dtype", args.dtype, "--threads", str(threads)]

    def side(engine: str) -> Callable[[], float]:
        def one_start() -> float:
            started = time.monotonic()
            run = measure_engine(engine, model, flags, tensors, pushes, args.seed, logs)
            runs[engine].append(run)
            print(f"  round {len(runs[engine])}, {engine}: {describe_run(run)}", flush=True)
            return time.monotonic() - started

        return one_start

    alternate({engine: side(engine) for engine in ENGINES}, rounds)
    code = print_comparison(runs)
    print(f"engine comparison: {time.monotonic() - began:.0f} s in all")
    return code


def measure_engine(
    engine: str,
    model: str,
    flags: list[str],
    tensors: dict[str, torch.Tensor],
    pushes: int,
    seed: int,
    logs: Path,
) -> EngineRun:
    """Starts the policy service on `engine`, measures Generate and UpdateWeights, stops it."""
    from rlhf.clients import PolicyClient
    from tools.launch import start_service

    args = ["policy", "serve", "--model", model, "--engine", engine, "--no-auth", *flags]
    started = time.monotonic()
    service = start_service(f"policy-{engine}", args, logs)  # run by engine_python(engine)
    run = EngineRun(start_s=time.monotonic() - started)
    client = PolicyClient(service.address)
    try:
        served = client.info().engine
        if served != engine:
            raise RuntimeError(f"asked for the {engine} engine, the service runs {served!r}")
        _generate(client, max(BATCHES), WARM_UP_TOKENS, seed)  # warm-up, not measured
        for batch in BATCHES:
            run.generate_s[batch], run.tokens[batch] = _generate(client, batch, NEW_TOKENS, seed)
        run.update_service_s, run.update_wall_s = _pushes(client, tensors, pushes)
    except Exception as err:
        raise RuntimeError(f"{engine} engine: {err}\n{service.log_tail()}") from err
    finally:
        client.close()
        service.stop()
    return run


def _generate(client: PolicyClient, batch: int, new_tokens: int, seed: int) -> tuple[float, int]:
    """Seconds of one Generate of `batch` prompts and exactly `new_tokens` each; tokens made."""
    from rlhf.v1 import policy_pb2

    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    params = policy_pb2.GenerationParams(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=seed
    )
    started = time.perf_counter()
    reply = client.generate(prompts, params)
    seconds = time.perf_counter() - started
    return seconds, sum(len(c.response_token_ids) for c in reply.completions)


def _pushes(
    client: PolicyClient, tensors: dict[str, torch.Tensor], measured: int
) -> tuple[float, float]:
    """Median (service seconds, client wall seconds) of `measured` full pushes, after the
    warm-up pushes; each push's version must be the one served afterwards."""
    version = client.info().weight_version
    service_s: list[float] = []
    wall_s: list[float] = []
    for push in range(WARM_UP_PUSHES + measured):
        version += 1
        started = time.perf_counter()
        reply = client.update_weights(tensors, version)
        wall = time.perf_counter() - started
        serving = client.info().weight_version
        if reply.version != version or serving != version:
            raise RuntimeError(
                f"pushed version {version}: the reply says {reply.version}, GetInfo {serving}"
            )
        if push >= WARM_UP_PUSHES:
            service_s.append(reply.seconds)
            wall_s.append(wall)
    return statistics.median(service_s), statistics.median(wall_s)


def sent_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as a trainer sends it: tied tensors (lm_head = embeddings) once."""
    weights = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor
    return weights


def describe_run(run: EngineRun) -> str:
    """One start's numbers on one line."""
    rates = ", ".join(f"batch {b} {run.tokens[b] / s:.1f} tok/s" for b, s in run.generate_s.items())
    return (
        f"started in {run.start_s:.1f} s; {rates}; UpdateWeights {run.update_service_s:.3f} s "
        f"(service), {run.update_wall_s:.3f} s (client)"
    )


def _spread(values: list[float], digits: int) -> str:
    """'MEDIAN [MIN-MAX]'."""
    return (
        f"{statistics.median(values):.{digits}f} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


def _row(name: str, value: Callable[[EngineRun], float], digits: int, hf: list[EngineRun],
         vllm: list[EngineRun]) -> str:  # fmt: skip
    """One measure: each engine's median round [range], the vllm/hf ratio's median [range] and
    every round's ratio."""
    hf_values, vllm_values = [value(r) for r in hf], [value(r) for r in vllm]
    ratios = [v / h for h, v in zip(hf_values, vllm_values, strict=True)]
    return (
        f"{name:<42} {_spread(hf_values, digits):>23} {_spread(vllm_values, digits):>23} "
        f"{_spread(ratios, 2):>19}  {' '.join(f'{r:.2f}' for r in ratios)}"
    )


def print_comparison(runs: dict[str, list[EngineRun]]) -> int:
    """The table, then the token counts; 1 if an engine's count was not batch x NEW_TOKENS."""
    hf, vllm = runs["hf"], runs["vllm"]
    print(f"\n{'measure (median round [range])':<42} {'hf':>23} {'vllm':>23} "
          f"{'vllm/hf':>19}  per round")  # fmt: skip
    for batch in BATCHES:
        name = f"Generate tok/s, batch {batch}, {NEW_TOKENS} new"
        print(_row(name, lambda r, b=batch: r.tokens[b] / r.generate_s[b], 1, hf, vllm))
    print(_row("UpdateWeights s, service (receive+apply)", lambda r: r.update_service_s, 3,
               hf, vllm))  # fmt: skip
    print(_row("UpdateWeights s, client (until served)", lambda r: r.update_wall_s, 3, hf, vllm))
    print(_row("start-up s (until SERVING)", lambda r: r.start_s, 1, hf, vllm))
    print("(tok/s: vllm/hf > 1 is vllm faster; seconds: vllm/hf > 1 is vllm slower)")
    same = True
    counts = []
    for batch in BATCHES:
        made = {engine: sorted({r.tokens[batch] for r in runs[engine]}) for engine in ENGINES}
        same &= all(m == [batch * NEW_TOKENS] for m in made.values())
        counts.append(f"batch {batch}: " + ", ".join(f"{e} {m}" for e, m in made.items()))
    print(f"tokens per call ({'; '.join(counts)}): the same on both engines: "
          f"{'yes' if same else 'NO'}")  # fmt: skip
    return 0 if same else 1
