"""Policy replicas: one policy service against two, with the cores split evenly between them.

(a) Generate tokens/s of one batch (--batch prompts, min = max new tokens, so both sides make
    exactly as many tokens: checked) through connect_policy: one `rlhf policy serve` with
    --threads 2 against a pool of two with --threads 1 each (issue #16). The ratio says what
    splitting a step's batch over replicas gains on this machine; on real hardware each
    replica has its own device, so the gain there is closer to the number of replicas.
(b) A full weight push (UpdateWeights of the model's state dict) to one replica against the
    parallel push to two: the fan-out's cost (the trainer encodes and sends every byte once per
    replica; seconds and their ratio).

How, and why:
- All three services run for the whole benchmark (an idle one waits on its socket and costs
  no CPU); each side gets one unmeasured Generate and two unmeasured pushes first (the
  service double-buffers: each receive buffer is touched once).
- Rounds alternate between the sides (ABBA, bench.measure.alternate) so that other work on
  the machine loads both alike; the ratio is the median of the rounds' ratios (2 replicas /
  1 replica, > 1: the pool is faster).

    python bench/bench_replicas.py              # SmolLM2-135M-Instruct (the default policy)
    python bench/bench_replicas.py --quick      # a tiny random model: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engines import PROMPTS, sent_tensors  # noqa: E402
from bench.measure import alternate, speed_ratios  # noqa: E402
from rlhf.config.flags import int_at_least  # noqa: E402
from rlhf.defaults import DEFAULT_POLICY_MODEL  # noqa: E402

SIDES = ("1 replica", "2 replicas")
WARM_UP_PUSHES = 2
"""Unmeasured pushes per side: one per receive buffer of each service's double buffer."""


def parse_flags(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model", default=DEFAULT_POLICY_MODEL, help="causal LM folder or hub name")
    add("--quick", action="store_true", help="a tiny random model, short rounds (smoke test)")
    add("--batch", type=int_at_least(2), default=16, help="prompts per Generate")
    add("--new-tokens", type=int_at_least(1), default=32, help="new tokens per completion")
    add("--rounds", type=int_at_least(1), default=4, help="measured Generate rounds per side")
    add("--push-rounds", type=int_at_least(1), default=4, help="measured pushes per side")
    add("--cores", type=int_at_least(2), default=2, help="torch threads split between sides")
    add("--seed", type=int, default=0)
    add("--logs", help="keep the services' logs in this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_flags(argv)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        model = args.model
        if args.quick:
            from tools.tiny import make_causal_lm

            model = str(make_causal_lm(Path(tmp) / "tiny-lm"))
            args.new_tokens, args.rounds, args.push_rounds = 8, 2, 2
        return run(args, model, Path(args.logs) if args.logs else Path(tmp) / "logs")


def run(args: argparse.Namespace, model: str, logs: Path) -> int:
    """Starts the services, measures both sides, prints the table; 1 if the token counts
    differ between the sides."""
    import torch

    from services.policy.loading import load_causal_lm
    from services.trainer.orchestrator.transports import connect_policy
    from tools.launch import start_service

    half = args.cores // 2
    serve = ["policy", "serve", "--model", model, "--no-auth", "--threads"]
    started = [start_service("policy-whole", [*serve, str(2 * half)], logs)]
    try:
        started += [start_service(f"policy-half-{i}", [*serve, str(half)], logs) for i in (1, 2)]
        specs = {
            SIDES[0]: started[0].address,
            SIDES[1]: f"{started[1].address},{started[2].address}",
        }
        policies = {side: connect_policy(spec) for side, spec in specs.items()}
        tensors = sent_tensors(load_causal_lm(model, torch.device("cpu"), torch.float32).model)
        print(
            f"policy replicas: model {model}; {SIDES[0]}: --threads {2 * half}; {SIDES[1]}: "
            f"--threads {half} each; batch {args.batch} x {args.new_tokens} new tokens; "
            f"{args.rounds} Generate rounds, {args.push_rounds} pushes, ABBA",
            flush=True,
        )
        try:
            return measure(args, policies, tensors)
        finally:
            for policy in policies.values():
                policy.close()
    finally:
        for service in started:
            service.stop(timeout_s=10)


def measure(args: argparse.Namespace, policies: dict, tensors: dict) -> int:
    from services.trainer.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    prompts = (PROMPTS * args.batch)[: args.batch]
    tokens: dict[str, list[int]] = {side: [] for side in SIDES}
    versions = {side: policies[side].facts().weight_version for side in SIDES}

    def generate(side: str) -> Callable[[], float]:
        def once() -> float:
            t = time.perf_counter()
            rollout = policies[side].generate(prompts, gen, seed=args.seed)
            seconds = time.perf_counter() - t
            tokens[side].append(sum(len(r) for r in rollout.response_ids))
            return seconds

        return once

    def push(side: str) -> Callable[[], float]:
        def once() -> float:
            versions[side] += 1
            t = time.perf_counter()
            policies[side].push_weights(tensors, versions[side])
            return time.perf_counter() - t

        return once

    for side in SIDES:  # warm-up, not measured
        generate(side)()
        for _ in range(WARM_UP_PUSHES):
            push(side)()
    for side in SIDES:
        tokens[side].clear()
    gen_s = alternate({side: generate(side) for side in SIDES}, args.rounds)
    push_s = alternate({side: push(side) for side in SIDES}, args.push_rounds)
    same = all(set(tokens[side]) == {args.batch * args.new_tokens} for side in SIDES)
    print_table(gen_s, push_s, tokens)
    print(f"tokens per Generate: {tokens[SIDES[0]][0]} on both sides: {'yes' if same else 'NO'}")
    return 0 if same else 1


def print_table(
    gen_s: dict[str, list[float]], push_s: dict[str, list[float]], tokens: dict[str, list[int]]
) -> None:
    one, two = SIDES
    print(f"\n{'round':<8}{one + ' tok/s':>18}{two + ' tok/s':>20}{'ratio (2/1)':>14}")
    gen_ratios = speed_ratios(gen_s[two], gen_s[one])
    for i, ratio in enumerate(gen_ratios):
        rates = [tokens[side][i] / gen_s[side][i] for side in SIDES]
        print(f"{i + 1:<8}{rates[0]:>18.1f}{rates[1]:>20.1f}{ratio:>14.2f}")
    median = statistics.median(gen_ratios)
    print(f"Generate tok/s ratio, 2 replicas / 1 (median of rounds): {median:.2f}")
    push_ratios = [b / a for a, b in zip(push_s[one], push_s[two])]
    print(
        f"full weight push s: 1 replica {statistics.median(push_s[one]):.3f}, 2 replicas "
        f"{statistics.median(push_s[two]):.3f}; push time ratio, 2 replicas / 1 (median of "
        f"rounds): {statistics.median(push_ratios):.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
