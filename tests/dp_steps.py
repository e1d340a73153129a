"""PPO steps on fixed rollouts, alone or as one rank under torchrun (tests/test_data_parallel.py).

    python tests/dp_steps.py MODEL OUT [--set field=value ...]
    torchrun --nproc-per-node 2 tests/dp_steps.py MODEL OUT --strategy fsdp ...

Runs STEPS steps of PPOTrainer on the rollouts of tests/test_ppo_step.py's `rollouts(seed)` (8
per step); rank 0 writes every step's stats (stats.json), the final trainable weights
(weights.safetensors) and the servable weights (servable.safetensors), gathered whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer.config import DATA_PARALLEL  # noqa: E402
from services.trainer.learner import parallel  # noqa: E402
from services.trainer.learner.config import PPOConfig  # noqa: E402
from services.trainer.learner.ppo_trainer import PPOTrainer  # noqa: E402
from services.trainer.learner.value_head import PolicyWithValueHead  # noqa: E402
from tests.test_ppo_step import rollouts  # noqa: E402

STEPS = 3
BATCH = 8


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", choices=DATA_PARALLEL, default="ddp")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    dp = parallel.init_from_env(args.strategy, "gloo")
    knobs: dict[str, object] = {
        "model_name": args.model,
        "learning_rate": 1e-3,
        "log_with": None,
        "batch_size": BATCH,
        "mini_batch_size": 4,
        "value_head_dropout": 0.0,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        knobs[key] = json.loads(value)
    config = PPOConfig(**knobs)  # type: ignore[arg-type]
    model = PolicyWithValueHead.from_config(config)
    trainer = PPOTrainer(config, model, model.tokenizer, parallel=dp)
    history = []
    for step in range(1, STEPS + 1):
        queries, responses, scores = rollouts(step, BATCH)
        history.append(trainer.step(queries, responses, scores))
    weights = {k: parallel.full(v).detach().clone() for k, v in trainer.model.named_parameters()}
    servable = trainer.servable_state_dict()  # what a push sends (LoRA merged), gathered whole
    if dp is None or dp.leader:
        args.out.mkdir(parents=True, exist_ok=True)
        stats = [{k: v for k, v in s.items() if not k.startswith("time/")} for s in history]
        (args.out / "stats.json").write_text(json.dumps(stats))
        save_file({k: v.contiguous() for k, v in weights.items()}, args.out / "weights.safetensors")
        save_file(
            {k: v.contiguous() for k, v in servable.items()}, args.out / "servable.safetensors"
        )
    parallel.shut_down()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
