"""What the SFT and reward-model stages share: output folders that appear only when complete,
the loss log, the TrainingArguments that keep TRL on CPU and off the hub, and the TRL trainer
built and saved the same way for both."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

STAGE_FILE = "stage.json"
"""Written last into every stage's output folder: its config and results."""
LOSS_FILE = "loss.jsonl"
"""One JSON object per logged optimizer step: step, loss and what TRL logged with it."""


class TrainingKnobs(Protocol):
    """The fields of SFTStageConfig and RMStageConfig that the shared training arguments read."""

    epochs: float
    max_steps: int
    learning_rate: float
    batch_size: int
    max_length: int
    seed: int


def refuse_existing(output: Path, force: bool) -> None:
    """An existing output folder is only replaced with --force."""
    if output.exists() and not force:
        raise FileExistsError(f"{output} already exists: pass --force to overwrite it")


@contextmanager
def staged_output(output: Path, force: bool) -> Iterator[Path]:
    """Yields an empty temporary folder beside `output`; when the block completes it replaces
    `output`. A crash leaves no half-written model folder behind that a later stage, or the
    pipeline's "skip when the output exists", would mistake for a finished one."""
    refuse_existing(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    # mkdtemp makes it owner-only; a model folder is read by services under other users too.
    staging.chmod(0o755)
    try:
        yield staging
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def start_stage(device: str, output: Path, force: bool) -> str:
    """What a stage checks before it reads any data or model: the device it trains on (returned,
    "cpu" or "cuda") and an output folder that is free or --force; and no HF progress bars."""
    kind = training_device(device)
    refuse_existing(output, force)
    quiet_hf()
    return kind


def training_device(name: str) -> str:
    """ "cpu" or "cuda". The HF Trainer places the model itself, on the first visible GPU; it
    cannot be pointed at cuda:N, so that is refused rather than silently run elsewhere."""
    from rlhf.models import parse_device

    device = parse_device(name)
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(
            f"--device {name}: training runs on the first visible GPU; "
            f"use CUDA_VISIBLE_DEVICES={device.index} with --device cuda"
        )
    return device.type


def common_training_args(output_dir: Path, device: str, knobs: TrainingKnobs) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and RewardConfig."""
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=knobs.epochs,
        max_steps=knobs.max_steps,  # > 0 overrides num_train_epochs
        learning_rate=knobs.learning_rate,
        per_device_train_batch_size=knobs.batch_size,
        max_length=knobs.max_length,
        seed=knobs.seed,
        data_seed=knobs.seed,
        use_cpu=device == "cpu",
        # TRL defaults to bf16 mixed precision; plain float32 works on every CPU and GPU.
        bf16=False,
        fp16=False,
        # TRL defaults to activation checkpointing: ~20% slower, and these models are small.
        activation_checkpointing=False,
        logging_steps=1,
        report_to="none",  # no wandb/tensorboard/hub; the loss goes to loss.jsonl
        save_strategy="no",  # the stage saves the final model itself, once
        eval_strategy="no",
        push_to_hub=False,
        disable_tqdm=True,  # LossLog prints one line per step instead
        dataloader_num_workers=0,
    )


def make_trainer(
    trainer_class: Any,
    args_class: Any,
    knobs: TrainingKnobs,
    device: str,
    staging: Path,
    model: Any,
    tokenizer: Any,
    dataset: Any,
) -> Any:
    """A TRL trainer (SFTTrainer with SFTConfig, RewardTrainer with RewardConfig) on the shared
    arguments, its loss logged into staging/loss.jsonl."""
    trainer = trainer_class(
        model=model,
        args=args_class(**common_training_args(staging, device, knobs)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    log_losses(trainer, staging / LOSS_FILE)
    return trainer


def save_trained(trainer: Any, staging: Path) -> None:
    """The trained model and its tokenizer (pad token and chat template included) into
    `staging`."""
    trainer.save_model(str(staging))
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; stage.json says it


def log_losses(trainer: Any, path: Path) -> None:
    """Makes `trainer` append each logged step to `path` and print it as one short line, in
    place of the Trainer's own printout of every log dict."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class LossLog(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary has train_loss, not loss
            row = {"step": int(state.global_step), **{k: float(v) for k, v in logs.items()}}
            with path.open("a") as out:
                out.write(json.dumps(row) + "\n")
            extra = "".join(
                f"  {key} {row[key]:.4f}" for key in ("accuracy", "margin") if key in row
            )
            print(
                f"step {row['step']:>4}/{state.max_steps}  loss {row['loss']:.4f}{extra}",
                flush=True,
            )

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LossLog())


def logged_losses(folder: Path) -> list[float]:
    """The loss of each logged step, from the loss.jsonl in `folder`."""
    lines = (folder / LOSS_FILE).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def quiet_hf() -> None:
    """No progress bars from datasets' map() or transformers' weight loading: the stages print
    one line per step, and bars would interleave with them."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
