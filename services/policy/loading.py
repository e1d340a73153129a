"""Loads the served causal LM and its tokenizer for one device and dtype, ready to sample from.

Ready means: in eval mode without gradients, in the process's own memory, the tokenizer padding
on the left (batched generation), a pad token, the stop tokens known, and a generation config
that carries nothing but them, so only a request's knobs decide how it is sampled.
"""

from __future__ import annotations

import logging
import mmap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.heap import release_freed_heap
from rlhf.models import resolve_model
from rlhf.weights import dtype_name
from services.policy.own_memory import own_memory

log = logging.getLogger("rlhf.policy.engine")


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, prepared for sampling (see the module docstring)."""

    model: Any
    """The transformers causal LM, in eval mode, gradients off."""
    tokenizer: Any
    """Its tokenizer: left padding, a pad token (the EOS token when it had none)."""
    eos_token_ids: list[int]
    """Every token that ends a completion: the tokenizer's EOS and the model's own."""
    context_length: int
    """Prompt + new tokens the model takes at most."""
    source: str
    """The folder or hub name it was loaded from (the model alias resolved)."""
    buffer: mmap.mmap | None = None
    """The buffer every CPU weight in the state dict lives in (None on other devices): the
    WeightStore's first backing buffer (see own_memory)."""


def load_causal_lm(model: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Loads `model` (a folder, a hub name or the default alias) onto `device` in `dtype`.

    Raises FileNotFoundError for a folder that is not there, RuntimeError for anything that
    does not load as a causal LM with a tokenizer that has an EOS token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = _source(model)
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as err:
        raise RuntimeError(
            f"cannot load {source!r} as a causal LM with its tokenizer: {err}"
        ) from err
    lm.to(device)
    lm.eval()
    lm.requires_grad_(False)
    buffer = own_memory(lm)
    release_freed_heap()  # a dtype cast's temporaries

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise RuntimeError(f"{source}: the tokenizer has no EOS token; generation cannot stop")
    eos_token_ids = _eos_token_ids(tokenizer, lm)
    # A clean generation config: the request's knobs alone decide sampling. A checkpoint's
    # own defaults (repetition_penalty, top_k=50, ...) would silently change the sampled
    # distribution away from the one whose log-probs we report.
    lm.generation_config = GenerationConfig(
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    loaded = LoadedModel(
        lm, tokenizer, eos_token_ids, _context_length(lm.config, tokenizer), source, buffer
    )
    log.info(
        "model loaded",
        extra={
            "model": model,
            "source": source,
            "device": str(device),
            "dtype": dtype_name(dtype),
            "num_parameters": sum(p.numel() for p in lm.parameters()),
            "context_length": loaded.context_length,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return loaded


def _source(model: str) -> str:
    source = resolve_model(model)
    if source.startswith("~"):
        source = str(Path(source).expanduser())
    # A path that is not there fails here, clearly, rather than as a hub lookup.
    if source.startswith(("/", "./", "../")) and not Path(source).is_dir():
        raise FileNotFoundError(f"model folder {source} does not exist")
    return source


def _eos_token_ids(tokenizer: Any, lm: Any) -> list[int]:
    eos: set[int] = {int(tokenizer.eos_token_id)}
    model_eos = lm.generation_config.eos_token_id
    if isinstance(model_eos, int):
        eos.add(model_eos)
    elif model_eos:
        eos.update(int(i) for i in model_eos)
    return sorted(eos)


def _context_length(config: object, tokenizer: object) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", 0)
    # Tokenizers without a limit report a huge sentinel (int(1e30)); that is no limit at all.
    return value if isinstance(value, int) and 0 < value < 10**9 else 2**31 - 1
