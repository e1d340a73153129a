"""Supervised fine-tuning with TRL's SFTTrainer: a causal LM + a JSONL dataset -> a model folder
that `rlhf policy serve --model FOLDER` serves as it is and that PPO starts from
(PPOConfig.model_name = FOLDER).

Data (JSONL, one format per file):
- {"prompt": "...", "completion": "..."}: plain strings. By default each row becomes a one-turn
  conversation (user: prompt, assistant: completion) rendered with the model's chat template,
  because that is how the policy service presents prompts during PPO (apply_chat_template);
  --no-chat-template trains on the raw strings instead. The loss covers the completion only.
- {"prompt": [messages], "completion": [messages]}: conversational prompt/completion.
- {"messages": [{"role": ..., "content": ...}, ...]}: whole conversations, loss on all of it.

The output folder holds the model (safetensors), its tokenizer with the chat template,
loss.jsonl (step, loss, ... per optimizer step) and stage.json (the config and results).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.defaults import DEFAULT_POLICY_MODEL
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

DEMO_DATA = Path(__file__).parent / "data" / "sft_demo.jsonl"
"""80 hand-written everyday questions with short, upbeat, helpful answers (see data/README.md)."""


@dataclass
class SFTStageConfig:
    """`rlhf sft`: what to fine-tune, on what, and how."""

    model: str = DEFAULT_POLICY_MODEL
    """Base causal LM: a folder, a hub name, or the alias of the embedded SmolLM2-135M-Instruct."""
    data: str = str(DEMO_DATA)
    """JSONL of prompt/completion or messages rows (default: the shipped demo set)."""
    output: str = "runs/sft"
    """Model folder to write; it must not exist unless force."""
    epochs: float = 2.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps; > 0 overrides epochs."""
    learning_rate: float = 5e-5
    """AdamW learning rate, decayed linearly to 0 (TRL's SFT default is 2e-5; the demo set is
    small, so a little more moves the style within a couple of epochs)."""
    batch_size: int = 8
    """Rows per optimizer step."""
    max_length: int = 256
    """Tokens per row; longer rows are truncated at the end."""
    seed: int = 0
    """Seed of the data order (and of anything random in the model)."""
    device: str = "cpu"
    """cpu or cuda (float32 on both)."""
    chat_template: bool = True
    """Render plain-string prompt/completion rows with the tokenizer's chat template."""
    force: bool = False
    """Overwrite an existing output folder."""


@dataclass
class SFTResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def load_sft_rows(path: Path, chat_template: bool) -> tuple[list[dict[str, Any]], str]:
    """The rows in the form SFTTrainer takes, and their format: "prompt-completion",
    "conversational prompt-completion" or "messages"."""
    rows = read_jsonl(path)
    first = rows[0]
    if "messages" in first:
        kind, keys = "messages", {"messages"}
    elif "prompt" in first and "completion" in first:
        keys = {"prompt", "completion"}
        plain = isinstance(first["prompt"], str)
        kind = "prompt-completion" if plain else "conversational prompt-completion"
    else:
        raise ValueError(
            f"{path}:1: expected the fields prompt and completion, or messages; got {sorted(first)}"
        )
    out = []
    for number, row in enumerate(rows, start=1):
        if not keys <= row.keys():
            raise ValueError(f"{path}: row {number} lacks {sorted(keys - row.keys())}")
        if kind == "prompt-completion":
            prompt, completion = row["prompt"], row["completion"]
            if not (isinstance(prompt, str) and isinstance(completion, str) and completion):
                raise ValueError(f"{path}: row {number}: prompt and completion must be strings")
            if chat_template:
                row = {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            else:
                row = {"prompt": prompt, "completion": completion}
        else:
            for key in keys:
                if not (isinstance(row[key], list) and row[key]):
                    raise ValueError(f"{path}: row {number}: {key} must be a list of messages")
            row = {key: row[key] for key in keys}
        out.append(row)
    return out, kind


def load_causal_lm(name: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, source) in float32; a clear error when it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import resolve_model

    source = resolve_model(name)
    looks_local = source.startswith(("/", "./", "../", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"base model folder {source} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    except Exception as err:
        raise RuntimeError(
            f"cannot load {source!r} as a causal LM with its tokenizer: {err}"
        ) from err
    if tokenizer.eos_token is None:
        raise ValueError(f"{source}: the tokenizer has no EOS token; completions could not end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss
    return model, tokenizer, source


def train_sft(config: SFTStageConfig) -> SFTResult:
    """Fine-tunes config.model on config.data and writes the model folder config.output."""
    from trl import SFTConfig, SFTTrainer

    device = training_device(config.device)
    output = Path(config.output)
    if output.exists() and not config.force:
        raise FileExistsError(f"{output} already exists: pass --force to overwrite it")
    quiet_hf()
    rows, kind = load_sft_rows(Path(config.data), config.chat_template)
    model, tokenizer, source = load_causal_lm(config.model)
    if kind != "prompt-completion" or config.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{source}: the tokenizer has no chat template, which {kind} data needs"
                + (" (or pass --no-chat-template)" if kind == "prompt-completion" else "")
            )
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    print(f"sft: {source} on {len(rows)} {kind} rows from {config.data}", flush=True)
    started = time.monotonic()
    with staged_output(output, config.force) as staging:
        args = SFTConfig(
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
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        log_losses(trainer, staging / LOSS_FILE)
        trainer.train()
        trainer.save_model(str(staging))  # the model, its tokenizer and chat template
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; stage.json says it
        losses = [row["loss"] for row in read_losses(staging / LOSS_FILE)]
        seconds = time.monotonic() - started
        steps = int(trainer.state.global_step)
        write_json(
            staging / STAGE_FILE,
            {
                "stage": "sft",
                "config": asdict(config),
                "base_model": source,
                "data_format": kind,
                "rows": len(rows),
                "steps": steps,
                "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None,
                "seconds": round(seconds, 1),
            },
        )
    curve = f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    print(
        f"sft: {steps} steps in {seconds:.0f} s{curve}; model in {output} "
        f"(serve it: rlhf policy serve --model {output})",
        flush=True,
    )
    return SFTResult(output=output, steps=steps, losses=losses, seconds=seconds)
