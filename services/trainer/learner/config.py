"""PPOConfig: every knob of the PPO stage, under the names of classic TRL (<= 0.11).

One dataclass, a docstring under each field (CleanRL style); `--help` texts are read from those
docstrings. Three ways in besides the constructor: a YAML file or text (`from_yaml`),
"key=value" overrides (`apply_overrides`, also what the trainer's control API passes on), and
argparse flags `--field-name value` (`add_config_arguments` + `config_from_args`).

Defaults are TRL 0.11's, except where the seed exercise set a value (batch_size=4,
mini_batch_size=2, target_kl=0.1) and `max_grad_norm` (TRL: None, no clipping; here 1.0).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

KL_PENALTIES = ("kl", "abs", "mse", "full")
LOGGERS = (None, "tensorboard", "jsonl")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PPOConfig:
    """Configuration of the PPO stage (policy + value head, reference, KL control, optimiser)."""

    # --- model -------------------------------------------------------------------------------
    model_name: str = "smollm2-135m-instruct"
    """Policy to start from: a model folder, a hub name, or the alias of the embedded default
    (SmolLM2-135M-Instruct, converted once into the model cache). The frozen reference is the
    same weights."""
    device: str = "cpu"
    """Where the policy, value head and reference live: cpu, cuda or cuda:N."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16. The value head and all PPO math stay in
    float32 whatever this is."""
    value_head_dropout: float = 0.1
    """Dropout on the last hidden state before the value head (TRL's summary_dropout_prob,
    default 0.1). Like every dropout of the model, it acts only with dropout_in_update: by
    default every forward pass runs in eval mode, as in TRL 0.11."""
    dropout_in_update: bool = False
    """Run the PPO epochs' forward passes in train mode, dropout active (attention, LoRA and
    value-head dropout). False, as TRL 0.11: every forward pass runs in eval mode, so the
    probability ratio starts at 1. Old log-probs, values and the reference are computed in eval
    mode either way."""

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = 1.41e-5
    """AdamW learning rate (weight decay 0, i.e. TRL's Adam)."""
    batch_size: int = 4
    """Rollouts (query, response, score) per PPO step; `step` requires exactly this many."""
    mini_batch_size: int = 2
    """Rollouts per forward/backward pass inside the PPO epochs."""
    gradient_accumulation_steps: int = 1
    """Mini-batches whose gradients are summed (each loss divided by this) per optimiser step."""
    ppo_epochs: int = 4
    """Passes over the batch, each in a fresh random order of mini-batches."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of the trained parameters to this; None: no clipping
    (TRL's default was None)."""
    seed: int = 0
    """Seeds python, numpy and torch at trainer start, and the mini-batch shuffling."""

    # --- KL penalty and control --------------------------------------------------------------
    init_kl_coef: float = 0.2
    """Initial KL coefficient beta: per-token reward is -beta * KL(policy || reference)."""
    adap_kl_ctrl: bool = True
    """Adapt beta towards `target` (Ziegler et al. 2019); False: beta stays init_kl_coef."""
    target: float = 6.0
    """Target KL (nats, summed over a response, averaged over the batch) of the adaptive
    controller."""
    horizon: float = 10000
    """Horizon of the adaptive controller, in rollouts: beta moves by at most
    20% * batch_size / horizon per step."""
    kl_penalty: str = "kl"
    """Per-token KL estimate in the reward: kl (logp - ref_logp), abs (|logp - ref_logp|),
    mse (0.5 * (logp - ref_logp)^2), full (exact KL over the whole vocabulary)."""

    # --- PPO objective -----------------------------------------------------------------------
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """Lambda of GAE (bias/variance trade-off of the advantages)."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon: ratio is clipped to [1 - cliprange, 1 + cliprange]."""
    cliprange_value: float = 0.2
    """Value clip: new value predictions are kept within +-cliprange_value of the old ones."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (masked, mean kept) before GAE."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch (no backward, no optimiser step) whose mean probability ratio exceeds
    this: a guard against a diverging policy."""
    early_stopping: bool = False
    """Stop the PPO epochs of a step once the policy KL of the last mini-batch exceeds
    1.5 * target_kl (TRL's rule)."""
    target_kl: float = 0.1
    """Policy KL (old vs. new, per token) that early stopping aims at; used only with
    early_stopping."""
    score_clip: float | None = None
    """Clip scores from the reward service to [-score_clip, score_clip]; None: no clipping."""

    # --- LoRA ----------------------------------------------------------------------------------
    use_lora: bool = False
    """Train LoRA adapters instead of all weights; the reference is then the base model with
    the adapters switched off (no second copy in memory)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt (e.g. q_proj,v_proj); None: peft's default for the architecture."""

    # --- logging -----------------------------------------------------------------------------
    log_with: str | None = "tensorboard"
    """Where the training loop writes stats: tensorboard, jsonl, or None (nowhere)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def backward_batch_size(self) -> int:
        """Rollouts per optimiser step (TRL's name): mini_batch_size * accumulation steps."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    def validate(self) -> None:
        """Raises ValueError listing every invalid field."""
        errors: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        if not errors:
            need(
                self.batch_size % self.backward_batch_size == 0,
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size * "
                f"gradient_accumulation_steps ({self.mini_batch_size} * "
                f"{self.gradient_accumulation_steps} = {self.backward_batch_size})",
            )
        for name in ("learning_rate", "target", "horizon", "target_kl", "cliprange"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.cliprange_value > 0, f"cliprange_value must be > 0, got {self.cliprange_value}")
        need(self.ratio_threshold > 0, f"ratio_threshold must be > 0, got {self.ratio_threshold}")
        for name in ("init_kl_coef", "vf_coef"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            need(
                0 <= getattr(self, name) <= 1,
                f"{name} must be in [0, 1], got {getattr(self, name)}",
            )
        for name in ("max_grad_norm", "score_clip"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be > 0 or None, got {value}")
        for name in ("lora_dropout", "value_head_dropout"):
            need(
                0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}"
            )
        need(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(
            self.kl_penalty in KL_PENALTIES,
            f"kl_penalty must be one of {', '.join(KL_PENALTIES)}; got {self.kl_penalty!r}",
        )
        need(
            self.log_with in LOGGERS,
            f"log_with must be tensorboard, jsonl or None; got {self.log_with!r}",
        )
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        try:
            device = torch.device(self.device)
            need(device.type in ("cpu", "cuda"), f"device must be cpu or cuda[:N], got {device}")
        except (RuntimeError, TypeError):
            errors.append(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        need(bool(self.model_name), "model_name must not be empty")
        if errors:
            raise ValueError("invalid PPOConfig:\n  " + "\n  ".join(errors))

    # --- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (lists copied), safe for YAML/JSON."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: PPOConfig | None = None) -> PPOConfig:
        """A config from `base` (default: the defaults) with `values` applied, type-checked."""
        start = base.to_dict() if base is not None else {}
        start.update({key: _coerce(key, value) for key, value in values.items()})
        return cls(**start)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path, base: PPOConfig | None = None) -> PPOConfig:
        """From a YAML file (a path that exists) or YAML text: a flat mapping field: value."""
        source = "YAML text"
        text = str(path_or_text)
        if isinstance(path_or_text, Path) or ("\n" not in text and Path(text).is_file()):
            source = str(path_or_text)
            text = Path(path_or_text).read_text()
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"PPO config ({source}) must be a mapping of field: value, got "
                f"{type(loaded).__name__} {loaded!r} (a missing file is read as YAML text)"
            )
        return cls.from_dict(loaded, base)

    def apply_overrides(self, overrides: Iterable[str]) -> PPOConfig:
        """A NEW config with "key=value" overrides applied (this one is left unchanged).

        Values are converted from the field's type: bool (true/false/1/0/yes/no/on/off),
        int, float, str, None for optional fields (none/null), lists as "a,b" or "[a, b]".
        """
        values: dict[str, Any] = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip().lstrip("-").replace("-", "_")
            if not sep:
                raise ValueError(f"override {item!r} must look like key=value")
            values[key] = raw.strip()
        return PPOConfig.from_dict(values, base=self)


# --- field types, docs and conversion -------------------------------------------------------
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(PPOConfig)


def field_docs() -> dict[str, str]:
    """Each field's docstring, read from the source (as CleanRL/tyro do); {} if no source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(PPOConfig)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


_TRUE = ("1", "true", "yes", "on", "y", "t")
_FALSE = ("0", "false", "no", "off", "n", "f")
_NONE = ("none", "null", "~", "")


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(key: str, value: Any) -> Any:
    """`value` (a string from a flag/override, or a YAML value) as field `key`'s type."""
    types_ = _field_types()
    if key not in types_:
        close = difflib.get_close_matches(key, types_, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown PPOConfig field {key!r}{hint}")
    return coerce_value(value, types_[key], f"PPOConfig.{key}")


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """`value` (a CLI/override string or a YAML value) converted to a dataclass field's type:
    bool (true/false/yes/no/on/off/1/0), int, float, str, None for optional fields
    (none/null), lists as "a,b" or "[a, b]". Raises ValueError naming `where`."""
    tp, optional = _split_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE):
        if optional:
            return None
        raise ValueError(f"{where} cannot be None")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{where} must be a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else text.split(",")
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {value!r}")
        items = [str(v).strip() for v in value]
        return [v for v in items if v]
    raise TypeError(f"{where}: unsupported field type {tp}")  # pragma: no cover


# --- argparse ---------------------------------------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Adds `--{prefix}field-name VALUE` for every field; absent flags keep the base value.

    Booleans also work bare (`--use-lora` means true). Values go through the same conversion
    as `apply_overrides`.
    """
    docs = field_docs()
    defaults = PPOConfig().to_dict()
    group = parser.add_argument_group("PPO config")
    for name, tp in _field_types().items():
        base, _ = _split_optional(tp)
        flag = "--" + prefix + name.replace("_", "-")
        default_text = f" (default: {defaults[name]!r})"
        kwargs: dict[str, Any] = {
            "dest": _dest(name, prefix),
            "default": argparse.SUPPRESS,
            "help": (docs.get(name, "") + default_text).replace("%", "%%"),
            "metavar": name.upper(),
        }
        if base is bool:
            kwargs.update(nargs="?", const="true")
        group.add_argument(flag, **kwargs)


def config_from_args(
    args: argparse.Namespace, base: PPOConfig | None = None, prefix: str = ""
) -> PPOConfig:
    """The config `add_config_arguments` flags describe, applied on top of `base`."""
    values = {
        name: getattr(args, _dest(name, prefix))
        for name in _field_types()
        if hasattr(args, _dest(name, prefix))
    }
    return PPOConfig.from_dict(values, base=base)


def _dest(name: str, prefix: str) -> str:
    return "ppo_config__" + prefix.replace("-", "_") + name


__all__ = [
    "KL_PENALTIES",
    "PPOConfig",
    "add_config_arguments",
    "config_from_args",
    "field_docs",
]
