"""A checkpoint's trainer state on disk as safetensors + JSON: loading it runs no code.

    trainer_state.safetensors   every tensor (trainable weights, optimizer moments and step
                                counts, torch/CUDA/generator RNG states, numpy's key array)
    trainer_state.json          everything else (python's RNG state, KL controller, optimizer
                                hyper-parameters, sampler position, step, config), with each
                                tensor replaced by {"__tensor__": KEY}

Why not torch.save + torch.load(weights_only=True): that still runs an unpickler over a file
in a folder other processes may write, and its allow-list has had bypasses; safetensors is a
JSON header plus raw bytes and JSON is data, so a planted file can at worst fail to load. Bytes
round-trip exactly, so a resume stays bit-identical. Checkpoints of the old format
(trainer_state.pt, a pickle) are refused unopened; `python -m
services.trainer.orchestrator.trainer_state convert FOLDER` converts one the operator trusts.
"""

from __future__ import annotations

import argparse
import json
import pickle  # only for its error type: nothing here unpickles by itself
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
CONVERT_COMMAND = "python -m services.trainer.orchestrator.trainer_state convert"
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


class LegacyCheckpoint(ValueError):
    """A checkpoint in the old pickled format, which is never loaded on resume."""


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON data; its tensors moved into `tensors` under generated keys."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        # Non-string keys (the optimizer's parameter indices) keep their type as pairs.
        return {_DICT: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"trainer state holds a {type(value).__name__}, which has no file form")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _DICT in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_DICT]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def encode_state(state: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """`state` as (JSON data, its tensors by key): the file form, also sent between ranks."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, tensors), tensors


def decode_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """What encode_state took apart."""
    return _decode(data, tensors)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Writes `state` (nested dicts, lists, tuples, tensors, plain values) into `folder`."""
    data, tensors = encode_state(state)
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(data))


def read_state(folder: Path) -> dict[str, Any]:
    """What write_state wrote. Raises LegacyCheckpoint, unopened, for the old format."""
    if not (folder / STATE_JSON).is_file():
        if (folder / LEGACY_STATE).is_file():
            raise LegacyCheckpoint(
                f"checkpoint {folder} is in the old format ({LEGACY_STATE}, a pickle), which "
                "this trainer does not load: unpickling can run code. If you trust the file, "
                f"convert it once with `{CONVERT_COMMAND} {folder}`, then resume"
            )
        raise FileNotFoundError(f"checkpoint {folder} has no {STATE_JSON}")
    tensors = load_file(str(folder / STATE_TENSORS))
    state = _decode(json.loads((folder / STATE_JSON).read_text()), tensors)
    if not isinstance(state, dict):
        raise ValueError(f"{folder / STATE_JSON} does not hold a trainer state")
    return state


MAX_STATE_JSON_BYTES = 64 * 1024 * 1024
"""Largest trainer_state.json read_summary opens (a tiny run's is ~40 KB; tensors are not in it)."""


def read_summary(folder: Path) -> dict[str, Any]:
    """A checkpoint's step, weight_version, reward endpoints ("rewards", spec strings) and the
    last step it holds scored ("scored_through": step plus its samples prefetched at
    run.max_staleness >= 1), read from trainer_state.json alone: no tensor is loaded. Raises
    ValueError (OSError for an unreadable file) when the file is missing, too large or not a
    trainer state."""
    path = folder / STATE_JSON
    size = path.stat().st_size
    if size > MAX_STATE_JSON_BYTES:
        raise ValueError(f"{path} is {size} bytes, above {MAX_STATE_JSON_BYTES}")
    data = json.loads(path.read_text())
    step = data.get("step") if isinstance(data, dict) else None
    rewards = data.get("rewards", []) if isinstance(data, dict) else None
    if (
        not isinstance(step, int)
        or not isinstance(data.get("weight_version", 0), int)
        or not isinstance(rewards, list)
        or not all(isinstance(r, str) for r in rewards)
    ):
        raise ValueError(f"{path} does not hold a trainer state (step, weight_version, rewards)")
    pending = data.get("pending", [])
    if not isinstance(pending, list):
        raise ValueError(f"{path}: its prefetched samples (pending) are not a list")
    return {
        "step": step,
        "weight_version": data.get("weight_version", 0),
        "rewards": rewards,
        "scored_through": step + len(pending),
    }


def legacy_refusal(folder: Path) -> str:
    """Why `folder` cannot be resumed because it is in the old format; "" when it is not."""
    try:
        if not (folder / STATE_JSON).is_file():
            read_state(folder)
    except LegacyCheckpoint as err:
        return str(err)
    except FileNotFoundError:
        return ""  # not the old format: the resume itself reports what is missing
    return ""


def convert_legacy(folder: Path) -> None:
    """Rewrites an old checkpoint's trainer_state.pt as safetensors + JSON. The pickle is read
    with torch.load(weights_only=True) (no arbitrary objects); run this only on a file you
    trust. The old file is kept beside the new ones."""
    state = torch.load(folder / LEGACY_STATE, weights_only=True, map_location="cpu")
    write_state(folder, state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=CONVERT_COMMAND.removesuffix(" convert"),
        description="Convert old checkpoints (trainer_state.pt) to safetensors + JSON.",
    )
    parser.add_argument("command", choices=["convert"])
    parser.add_argument("folders", nargs="+", type=Path, help="checkpoint folders (step-NNNNNN)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        try:
            convert_legacy(folder)
        except (OSError, RuntimeError, TypeError, pickle.UnpicklingError) as err:
            print(f"{folder}: {err}", file=sys.stderr)
            return 1
        print(f"{folder}: converted ({STATE_JSON}, {STATE_TENSORS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
