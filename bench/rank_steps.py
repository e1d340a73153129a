"""PPO steps of the learner on fixed rollouts, timed: one side of bench/bench_ranks.py.

    python bench/rank_steps.py MODEL OUT --threads 2                      # one process
    torchrun --nproc-per-node 2 bench/rank_steps.py MODEL OUT --threads 1 # two DDP ranks

Each rank writes OUT/rank-R.json: its rank, the seconds of every timed step (after one warm-up
step), the first step's statistics, its peak resident memory and the gradient bytes one
all-reduce moves. A file per rank, not a line on stdout: the ranks share torchrun's stdout, and
two lines written at once can interleave.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer.config import DATA_PARALLEL  # noqa: E402
from services.trainer.learner import parallel  # noqa: E402
from services.trainer.learner.config import PPOConfig  # noqa: E402
from services.trainer.learner.ppo_trainer import PPOTrainer  # noqa: E402
from services.trainer.learner.value_head import PolicyWithValueHead  # noqa: E402

PROMPT_TOKENS = 24
"""Tokens per query: a short instruction, as the seed's prompts."""


def rollouts(step: int, batch: int, response_tokens: int, vocab: int) -> tuple[list, list, list]:
    """The same queries, responses and scores for every run of the bench (seeded by step)."""
    g = torch.Generator().manual_seed(step)
    queries = [torch.randint(10, vocab, (PROMPT_TOKENS,), generator=g) for _ in range(batch)]
    responses = [torch.randint(10, vocab, (response_tokens,), generator=g) for _ in range(batch)]
    return queries, responses, torch.randn(batch, generator=g).tolist()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path, help="folder for each rank's rank-R.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mini-batch", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--strategy", choices=DATA_PARALLEL, default="ddp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dp = parallel.init_from_env(args.strategy, "gloo")
    config = PPOConfig(
        model_name=args.model,
        batch_size=args.batch,
        mini_batch_size=args.mini_batch,
        log_with=None,
    )
    model = PolicyWithValueHead.from_config(config)
    trainer = PPOTrainer(config, model, model.tokenizer, parallel=dp)
    vocab = len(model.tokenizer)
    seconds, first = [], {}
    for step in range(args.steps + 1):
        batch = rollouts(step, args.batch, args.response_tokens, vocab)
        started = time.perf_counter()
        stats = trainer.step(*batch)
        if step == 0:
            first = {k: v for k, v in stats.items() if k.startswith(("ppo/loss", "objective/kl"))}
        else:
            seconds.append(time.perf_counter() - started)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rank = dp.rank if dp else 0
    report = {
        "rank": rank,
        "step_s": seconds,
        "stats": first,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "allreduce_mb": trained / 1e6,
    }
    (args.out / f"rank-{rank}.json").write_text(json.dumps(report))
    parallel.shut_down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
