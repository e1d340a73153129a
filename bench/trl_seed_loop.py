"""The seed exercise's PPO loop, run by TRL 0.11.4 itself: the baseline of bench_seed.py.

Runs INSIDE the venv that bench/trl_env.py prepares (trl 0.11.4, torch, transformers,
vaderSentiment), never the project's: it imports nothing from this repository.

The loop is the seed's (/work/shared/reference/seed-exercise.txt) at its own settings:
`AutoModelForCausalLMWithValueHead` policy and a second copy as the reference model, fp32, full
fine-tune; PPOConfig lr 1.41e-5, batch 4, mini-batch 2, 4 PPO epochs, init_kl_coef 0.2 with
adaptive KL; one `PPOTrainer.generate` per query (64 new tokens, top_k 0, top_p 1.0, sampled, no
chat template); the VADER compound score of the decoded query + response as the reward (the
seed scores "the full generated text including the prompt"); `PPOTrainer.step`. Two changes
make the seed's text run at all, neither changing the work: queries are 1-D tensors and
`generate(..., return_prompt=False)` (the seed hands `step` (1, L) queries and responses that
still hold the prompt, which `step` cannot concatenate), and no tensorboard logging (the seed
never calls log_stats; logging is not part of a step).

    python bench/trl_seed_loop.py --model FOLDER --steps 3 --warmup 1 --seed 0 --threads 2
    python bench/trl_seed_loop.py --model FOLDER --device cuda:1   # on the second GPU

--device says where TRL computes. TRL's Accelerator takes a GPU whenever one is visible, so the
loop shows it only the one asked for (CUDA_VISIBLE_DEVICES, set before torch loads): none for
cpu, the Nth for cuda:N. The queries and rewards go to the trainer's device, as the seed's
`.to(policy_model.device)` did.

prints one JSON line: episodes/s over the measured steps (warm-up excluded), median and mean
seconds per phase per step (generate, score, step), generated tokens/s, peak RSS and versions.
With --stdin-steps it prints {"ready": ...} after the warm-up, then runs one measured step per
line read from stdin ("step"), printing that step's JSON line, and the summary line at EOF:
this lets a caller alternate it step by step with another system (ABBA) without reloading.

Pin --threads to the cores the side may use: with 2 torch threads on the 2-core machine while
other processes ran, 4 SmolLM2 steps took over 20 minutes (OpenMP threads spin-waiting on a
descheduled sibling); with 1 thread, 34 s a step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SEED_QUERIES = [
    "Explain the concept of KL divergence in simple terms:",
    "Write a short poem about a robot learning:",
    "What are the main stages of RLHF?",
    "Suggest a name for a friendly AI assistant:",
]
"""The seed exercise's four queries, the default prompt batch (the same four every step)."""
PHASES = ("generate", "score", "step")
SEED_PPO: dict[str, Any] = {
    "learning_rate": 1.41e-5,
    "batch_size": 4,
    "mini_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "kl_penalty": "kl",
    "target_kl": 0.1,
    "init_kl_coef": 0.2,
    "adap_kl_ctrl": True,
    "ppo_epochs": 4,
}
"""The seed's PPOConfig arguments (seed and model aside); this project's PPOConfig has the same
names, so bench_seed.py passes them to the other side as ppo.* overrides."""
BATCH_SIZE = SEED_PPO["batch_size"]
"""Episodes per step."""
MAX_NEW_TOKENS = 64
"""The seed's generation_kwargs["max_new_tokens"]; min_length -1: EOS may end a response."""


def visible_devices(device: str, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES that shows TRL's Accelerator `device` alone ("cpu", "cuda",
    "cuda:N"), given the one this process was started with (None: unset, every GPU). ValueError
    for another form, or an index past the visible list."""
    if device == "cpu":
        return ""
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device {device!r}: use cpu, cuda or cuda:N")
    position = int(index or 0)
    if visible is None:
        return str(position)
    shown = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if position >= len(shown):
        raise ValueError(f"--device {device!r}: CUDA_VISIBLE_DEVICES={visible!r} shows fewer")
    return shown[position]


def _flags(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a causal LM folder")
    parser.add_argument("--device", default="cpu", help="where TRL computes: cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=3, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first, not measured")
    parser.add_argument("--seed", type=int, default=0, help="PPOConfig.seed (sampling too)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument(
        "--prompts",
        type=Path,
        help="a JSONL file of {'prompt': ...} rows, taken 4 per step in order, cycling "
        "(default: the seed's four queries every step)",
    )
    parser.add_argument(
        "--stdin-steps", action="store_true", help="one measured step per stdin line (see above)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--steps must be >= 1, --warmup and --threads >= 0")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (not a model folder)")
    try:
        args.visible_devices = visible_devices(args.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ValueError as error:
        parser.error(str(error))
    return args


def _prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(SEED_QUERIES)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [str(row["prompt"]) for row in rows if str(row.get("prompt", "")).strip()]
    if len(prompts) < BATCH_SIZE:
        raise SystemExit(f"--prompts {path}: needs at least {BATCH_SIZE} non-empty prompts")
    return prompts


class SeedLoop:
    """The seed's models, tokenizer, PPOTrainer and VADER analyzer; run_step() is one step."""

    def __init__(self, model: Path, seed: int, prompts: list[str], device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._torch = torch
        config = PPOConfig(model_name=str(model), seed=seed, **SEED_PPO)
        # transformers 5 loads in the checkpoint's dtype by default; the seed ran fp32.
        policy = AutoModelForCausalLMWithValueHead.from_pretrained(str(model), dtype=torch.float32)
        ref = AutoModelForCausalLMWithValueHead.from_pretrained(str(model), dtype=torch.float32)
        for name, param in list(policy.named_parameters()) + list(ref.named_parameters()):
            if param.dtype != torch.float32:
                raise SystemExit(f"{model}: parameter {name} loaded as {param.dtype}, not fp32")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.trainer = PPOTrainer(
            config=config, model=policy, ref_model=ref, tokenizer=self.tokenizer
        )
        # Where the Accelerator put the models: the one device main() left visible.
        self.device = self.trainer.accelerator.device
        if self.device.type != device.partition(":")[0]:
            raise SystemExit(f"--device {device}: TRL's Accelerator chose {self.device}")
        self.analyzer = SentimentIntensityAnalyzer()
        self.prompts = prompts
        self.generation_kwargs = {
            "min_length": -1,
            "top_k": 0.0,
            "top_p": 1.0,
            "do_sample": True,
            "pad_token_id": self.tokenizer.pad_token_id,
            "max_new_tokens": MAX_NEW_TOKENS,
        }
        self.steps_done = 0

    def run_step(self) -> dict[str, Any]:
        """Generate (one query at a time), score, PPOTrainer.step; seconds of each phase."""
        torch = self._torch
        start = self.steps_done * BATCH_SIZE
        texts = [self.prompts[(start + i) % len(self.prompts)] for i in range(BATCH_SIZE)]
        queries = [
            self.tokenizer.encode(t, return_tensors="pt").squeeze(0).to(self.device) for t in texts
        ]
        started = time.perf_counter()
        responses = [
            self.trainer.generate(q, return_prompt=False, **self.generation_kwargs).squeeze(0)
            for q in queries
        ]
        generated = time.perf_counter()
        decoded = [
            self.tokenizer.decode(torch.cat([q, r]), skip_special_tokens=True)
            for q, r in zip(queries, responses)
        ]
        rewards = [
            torch.tensor(
                self.analyzer.polarity_scores(text)["compound"],
                dtype=torch.float32,
                device=self.device,
            )
            for text in decoded
        ]
        scored = time.perf_counter()
        stats = self.trainer.step(queries, responses, rewards)
        stepped = time.perf_counter()
        self.steps_done += 1
        return {
            "episodes": len(responses),
            "seconds": stepped - started,
            "generate": generated - started,
            "score": scored - generated,
            "step": stepped - scored,
            "generated_tokens": sum(int(r.numel()) for r in responses),
            "reward_mean": float(torch.stack(rewards).mean()),
            "kl": float(stats["objective/kl"]),
            "kl_coef": float(stats["objective/kl_coef"]),
        }


def _versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
    }


def summarize(rows: list[dict[str, Any]], warmup_s: float, load_s: float) -> dict[str, Any]:
    """The measured steps' totals: episodes/s over their sum, per-phase median and mean."""
    seconds = sum(r["seconds"] for r in rows)
    generate_s = sum(r["generate"] for r in rows)
    return {
        "side": "trl-0.11.4",
        "steps": len(rows),
        "episodes": sum(r["episodes"] for r in rows),
        "episodes_per_s": sum(r["episodes"] for r in rows) / seconds,
        "phase_s_median": {p: statistics.median(r[p] for r in rows) for p in PHASES},
        "phase_s_mean": {p: statistics.fmean(r[p] for r in rows) for p in PHASES},
        "step_s": [r["seconds"] for r in rows],
        "generated_tokens": sum(r["generated_tokens"] for r in rows),
        "generated_tokens_per_s": sum(r["generated_tokens"] for r in rows) / generate_s,
        "warmup_s": warmup_s,
        "load_s": load_s,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": __import__("torch").get_num_threads(),
        "versions": _versions(),
    }


def _emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _progress(name: str, row: dict[str, Any]) -> None:
    """One line on stderr per step: a SmolLM2 step takes tens of seconds on a busy machine."""
    phases = ", ".join(f"{p} {row[p]:.1f} s" for p in PHASES)
    print(f"trl_seed_loop: {name}: {row['seconds']:.1f} s ({phases})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _flags(argv)
    # Before torch is imported, so its OpenMP pool starts at this size and CUDA shows the GPU
    # asked for alone (or none).
    os.environ["CUDA_VISIBLE_DEVICES"] = args.visible_devices
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    loop = SeedLoop(args.model, args.seed, _prompts(args.prompts), args.device)
    loaded = time.perf_counter()
    for number in range(args.warmup):
        _progress(f"warm-up {number + 1}", loop.run_step())
    warmup_s = time.perf_counter() - loaded
    rows: list[dict[str, Any]] = []
    if args.stdin_steps:
        _emit({"ready": True, "load_s": loaded - began, "warmup_s": warmup_s})
        for line in sys.stdin:
            if line.strip() != "step":
                raise SystemExit(f"stdin: expected 'step', got {line.strip()!r}")
            rows.append(loop.run_step())
            _emit(rows[-1])
        if not rows:
            raise SystemExit("stdin closed before any 'step': nothing measured")
    else:
        for number in range(args.steps):
            rows.append(loop.run_step())
            _progress(f"step {number + 1}/{args.steps}", rows[-1])
    _emit(summarize(rows, warmup_s, loaded - began))
    return 0


if __name__ == "__main__":
    sys.exit(main())
