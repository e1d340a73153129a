"""Any Hugging Face sequence classifier as a reward: a trained reward model or a sentiment model.

Two shapes are served:
- a single-logit model (num_labels == 1, what TRL's RewardTrainer produces): the score is that
  logit;
- a multi-label classifier: the score is the softmax probability of --label (the seed scored
  the "POSITIVE" probability of a text-classification pipeline), or with --logit the raw logit
  of --label.

Texts are truncated to the model's maximum length, sorted by token length and scored in forward
passes of at most max_batch_size, right-padded, so that padding never changes a score (the
classifier reads the last non-pad token, and causal attention never looks at later pads).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.models import parse_device, parse_dtype
from services.reward.backends.base import RewardBackend

log = logging.getLogger("rlhf.reward.hf")

# Tokenizers without a real limit report model_max_length as a huge sentinel (1e30).
_NO_LIMIT = 1_000_000
_FALLBACK_MAX_LENGTH = 512


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def resolve_label(id2label: dict[int, str], label: str) -> int:
    """The index of `label` among the model's labels: exact match, else a unique
    case-insensitive one; a clear error listing the labels otherwise."""
    for index, name in id2label.items():
        if name == label:
            return int(index)
    folded = [int(i) for i, name in id2label.items() if name.lower() == label.lower()]
    if len(folded) == 1:
        return folded[0]
    labels = ", ".join(id2label[i] for i in sorted(id2label))
    raise ValueError(f"--label {label!r} is not one of the model's labels: {labels}")


def _load(model: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, classifier) in eval mode on `device`, padding on the right with a pad id."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype)
    net.to(device).eval()
    # Right padding: the classifier pools the last non-pad token, and with causal attention
    # the tokens before the pads never see them, so a padded row scores as it would alone.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{model}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    text_config = net.config.get_text_config()
    if text_config.pad_token_id is None:
        # The classifier finds each row's last real token by this id (and refuses batches
        # without it).
        text_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, net


class HFClassifierBackend(RewardBackend):
    """AutoTokenizer + AutoModelForSequenceClassification, on one device, in inference mode."""

    name = "hf-classifier"

    def __init__(
        self,
        model: str,
        label: str | None = None,
        logit: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 32,
    ) -> None:
        if not model:
            raise ValueError("the hf-classifier backend needs --model (a folder or hub name)")
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        self._device = parse_device(device)
        torch_dtype = parse_dtype(dtype)
        if _looks_like_path(model) and not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"reward model folder {model!r} does not exist")
        self.model = model
        self.device = str(self._device)
        self.max_batch_size = max_batch_size

        tokenizer, net = _load(model, self._device, torch_dtype)
        self._tokenizer = tokenizer
        self._net = net
        self._pad_id = int(tokenizer.pad_token_id)
        # An empty text tokenizes to nothing under tokenizers that add no special tokens; it is
        # scored as the single token BOS (else EOS, else PAD) instead of an empty tensor.
        filler = tokenizer.bos_token_id
        if filler is None:
            filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self._pad_id
        self._filler_id = int(filler)
        self.max_length = self._max_length(tokenizer, net)
        self.num_labels = int(net.config.num_labels)
        self.logit = logit
        self._choose_output(label, logit)
        log.info(
            "reward model loaded",
            extra={
                "model": model,
                "device": self.device,
                "dtype": dtype,
                "num_labels": self.num_labels,
                "label": self.label,
                "logit": self._use_logit,
                "max_length": self.max_length,
            },
        )

    def _choose_output(self, label: str | None, logit: bool) -> None:
        """Which output is the score (`_index`, `_use_logit`), its `label` and `description`."""
        num_labels = self.num_labels
        id2label = {int(i): str(name) for i, name in self._net.config.id2label.items()}
        self.label = ""
        if num_labels == 1:
            # A reward model's one logit is the reward; a softmax over it would always be 1.
            if label is not None and resolve_label(id2label, label) != 0:
                raise ValueError(f"--label {label!r} does not name the model's only label")
            self._index = 0
            self._use_logit = True
            self.description = (
                "the scalar logit of a single-output reward model (unbounded; higher is better)"
            )
            return
        if label is None:
            labels = ", ".join(id2label[i] for i in sorted(id2label))
            raise ValueError(
                f"{self.model} has {num_labels} labels ({labels}): choose one with --label "
                "(its probability is the reward; add --logit for its raw logit)"
            )
        self._index = resolve_label(id2label, label)
        self.label = id2label[self._index]
        self._use_logit = logit
        if logit:
            self.description = f"the raw logit of label {self.label} (unbounded)"
        else:
            self.description = (
                f"the softmax probability of label {self.label} over the model's "
                f"{num_labels} labels, in [0, 1]"
            )

    @staticmethod
    def _max_length(tokenizer: Any, net: Any) -> int:
        limits = []
        if tokenizer.model_max_length and tokenizer.model_max_length < _NO_LIMIT:
            limits.append(int(tokenizer.model_max_length))
        positions = getattr(net.config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        return min(limits) if limits else _FALLBACK_MAX_LENGTH

    def score(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        encoded = self._tokenizer(texts, truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        rows = [{k: list(encoded[k][i]) for k in keys} for i in range(len(texts))]
        for row in rows:
            if not row["input_ids"]:
                row["input_ids"] = [self._filler_id]
                for key in keys[1:]:
                    row[key] = [1] if key == "attention_mask" else [0]
        # Similar lengths share a pass, so little compute goes to padding.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        scores: list[float] = [0.0] * len(rows)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            values = self._forward([rows[i] for i in chunk])
            for i, value in zip(chunk, values, strict=True):
                scores[i] = value
        return scores

    def _forward(self, rows: list[dict[str, list[int]]]) -> list[float]:
        width = max(len(row["input_ids"]) for row in rows)
        if "attention_mask" not in rows[0]:
            rows = [{**row, "attention_mask": [1] * len(row["input_ids"])} for row in rows]
        batch = {
            key: torch.tensor(
                [
                    row[key] + [self._pad_id if key == "input_ids" else 0] * (width - len(row[key]))
                    for row in rows
                ],
                dtype=torch.long,
            ).to(self._device)
            for key in rows[0]
        }
        with torch.inference_mode():
            logits = self._net(**batch).logits.float()
        if self._use_logit:
            values = logits[:, self._index]
        else:
            values = torch.softmax(logits, dim=-1)[:, self._index]
        return [float(v) for v in values.cpu().tolist()]
