"""Reading a run's configuration: YAML sections, then `key=value` overrides from the CLI/API.

    ppo: {learning_rate: 1.0e-4, ...}     -> PPOConfig
    generation: {max_new_tokens: 48}      -> GenerationConfig
    run: {steps: 30, rewards: [...]}      -> RunConfig

An override names a field as `section.field=value` or, when the name is unique across the
sections, as `field=value` (`learning_rate=1e-4`). Values are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from services.trainer.config import TrainConfig
from services.trainer.learner.config import coerce_value

SECTIONS = ("ppo", "generation", "run")


def _hints(section: object) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _set(section_obj: object, section: str, key: str, raw: Any) -> None:
    hints = _hints(section_obj)
    if key not in hints or key not in {f.name for f in dataclasses.fields(section_obj)}:
        known = ", ".join(sorted(f.name for f in dataclasses.fields(section_obj)))
        raise ValueError(f"{section}: unknown field {key!r}; known: {known}")
    setattr(section_obj, key, coerce_value(raw, hints[key], f"{section}.{key}"))


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
