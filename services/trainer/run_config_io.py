"""Reading a run's configuration: YAML sections, then `key=value` overrides from the CLI/API.

    ppo: {learning_rate: 1.0e-4, ...}     -> PPOConfig
    generation: {max_new_tokens: 48}      -> GenerationConfig
    run: {steps: 30, rewards: [...]}      -> RunConfig

An override names a field as `section.field=value` or, when the name is unique across the
sections, as `field=value` (`learning_rate=1e-4`). Values are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from services.trainer.loop import TrainConfig

SECTIONS = ("ppo", "generation", "run")


def coerce(raw: Any, annotation: Any, where: str) -> Any:
    """Converts a YAML value or a CLI string to a dataclass field's type, or raises ValueError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            if type(None) in typing.get_args(annotation):
                return None
        return coerce(raw, options[0], where)
    if origin is list:
        (item,) = typing.get_args(annotation) or (str,)
        if isinstance(raw, str):
            raw = [part for part in raw.split(",") if part] if raw else []
        if not isinstance(raw, list):
            raise ValueError(f"{where}: expected a list, got {raw!r}")
        return [coerce(x, item, where) for x in raw]
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {raw!r}")
    if annotation in (int, float, str):
        if annotation is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"{where}: expected an integer, got {raw!r}")
        try:
            return annotation(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {annotation.__name__}, got {raw!r}") from None
    return raw


def _hints(section: object) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _set(section_obj: object, section: str, key: str, raw: Any) -> None:
    hints = _hints(section_obj)
    if key not in hints or key not in {f.name for f in dataclasses.fields(section_obj)}:
        known = ", ".join(sorted(f.name for f in dataclasses.fields(section_obj)))
        raise ValueError(f"{section}: unknown field {key!r}; known: {known}")
    setattr(section_obj, key, coerce(raw, hints[key], f"{section}.{key}"))


def apply_overrides(config: TrainConfig, overrides: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected KEY=VALUE")
        key = key.strip().replace("-", "_")
        if "." in key:
            section, _, name = key.partition(".")
            if section not in SECTIONS:
                raise ValueError(f"override {item!r}: unknown section {section!r}")
        else:
            owners = [s for s in SECTIONS if key in _hints(getattr(config, s))]
            if not owners:
                raise ValueError(f"override {item!r}: no config field named {key!r}")
            if len(owners) > 1:
                raise ValueError(f"override {item!r}: ambiguous, write one of {owners}.{key}")
            section, name = owners[0], key
        _set(getattr(config, section), section, name, raw.strip())


def load_train_config(source: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file path or YAML text (None: defaults), then overrides."""
    config = TrainConfig()
    if source:
        text = Path(source).read_text() if Path(str(source)).is_file() else str(source)
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError("a run config is a mapping with sections ppo, generation, run")
        for section, values in data.items():
            if section not in SECTIONS:
                raise ValueError(f"unknown config section {section!r}; use {', '.join(SECTIONS)}")
            for key, raw in (values or {}).items():
                _set(getattr(config, section), section, key, raw)
    apply_overrides(config, overrides or [])
    for section in SECTIONS:
        check = getattr(getattr(config, section), "validate", None)
        if check is not None:
            check()
    return config


def dump_train_config(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
