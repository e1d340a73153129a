"""Loads the served causal LM and its tokenizer for one device and dtype, ready to sample from.

Ready means: in eval mode without gradients, in the process's own memory, the tokenizer padding
on the left (batched generation), a pad token, the stop tokens known, and a generation config
that carries nothing but them, so only a request's knobs decide how it is sampled.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.models import resolve_model
from rlhf.weights import dtype_name
from services.policy.weight_store import new_buffer

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
    WeightStore's first backing buffer (see _own_memory)."""


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
    buffer = _own_memory(lm)

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


def _own_memory(model: torch.nn.Module) -> mmap.mmap | None:
    """Moves the model's CPU weights (its state dict) out of the file mapping safetensors loads
    into, into one new_buffer() of the process's own; returns that buffer (None: no CPU weights).

    A mapped page is faulted in on first use and again whenever the kernel reclaims it from an
    idle server, and the first weight update would pay a copy-on-write fault for every 4 KiB:
    seconds on a VM. One mmapped buffer rather than a clone per tensor: the WeightStore holds it
    as a receive buffer, so the first full upload's buffer replaces it and it becomes the spare;
    clones would sit on the malloc heap, which keeps freed memory, one dead model's worth. Each
    tensor's file pages are dropped once it is copied, so the load peaks near one model's size,
    not two. Tied weights stay tied (a shared Parameter is one object, copied once).
    """
    targets: dict[int, torch.Tensor] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.device.type == "cpu":
            targets.setdefault(id(tensor), tensor)
    if not targets:
        return None
    offsets, total = [], 0
    for tensor in targets.values():
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // WEIGHT_ALIGN) * WEIGHT_ALIGN
    buffer = new_buffer(total)
    maps = _file_maps()
    with torch.no_grad():
        for tensor, offset in zip(targets.values(), offsets, strict=True):
            source = tensor.data
            copy = _view(buffer, offset, source)
            copy.copy_(source)
            tensor.data = copy
            _drop_file_pages(source, maps)
    # The rest (non-persistent buffers such as rotary tables) is computed, not loaded: it is
    # the process's own memory already, and it must not live in a buffer an upload reuses.
    return buffer


WEIGHT_ALIGN = 64
"""Byte alignment of each tensor in the load buffer: what WeightStore._adoptable asks of a
served tensor (as fast to compute with as torch's own memory)."""


def _view(buffer: mmap.mmap, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like `like` over `buffer` at `offset`."""
    if like.numel() == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    flat = torch.frombuffer(buffer, dtype=like.dtype, count=like.numel(), offset=offset)
    return flat.view(like.shape)


def _file_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    maps = []
    for line in lines:
        fields = line.split(maxsplit=5)
        # address perms offset dev inode path: a mapped file has an inode.
        if len(fields) == 6 and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.append((start, end))
    return maps


def _drop_file_pages(source: torch.Tensor, maps: list[tuple[int, int]]) -> None:
    """Drops this process's pages of `source`'s storage when they are a mapped file's own bytes.

    Safe: the tensor's .data now points at its copy and nothing reads the old storage; and even
    a read would see no change, as only pages that hold the file's bytes unwritten are dropped
    (a shared mapping's pages, a private one's never copied-on-write: checked in pagemap), and
    such a page faults the same bytes back in from the file. Anonymous memory is never touched:
    MADV_DONTNEED would zero it under whoever still uses it.
    """
    storage = source.untyped_storage()
    first, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    for start, end in maps:
        if start <= first and first + size <= end:
            low = max(start, first // page * page)
            high = min(end, -(-(first + size) // page) * page)
            if not _unwritten(low, high):
                return
            advice = mmap.MADV_DONTNEED
            if _libc().madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), advice):
                err = ctypes.get_errno()
                log.warning("madvise failed", extra={"errno": err, "error": os.strerror(err)})
            return


def _unwritten(low: int, high: int) -> bool:
    """Does no page in [low, high) hold anonymous memory (a private file page once written)?"""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(low // page * 8)
            entries = np.frombuffer(pagemap.read((high - low) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    # Bit 63: in memory, 62: swapped out, 61: a file page (or shared anonymous memory).
    in_use = (entries >> np.uint64(63)) | ((entries >> np.uint64(62)) & np.uint64(1))
    file_page = (entries >> np.uint64(61)) & np.uint64(1)
    return not bool(np.any(in_use & (file_page ^ np.uint64(1))))


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
