"""A config made of sections (a dataclass whose fields are config dataclasses): YAML text in,
`section.field=value` overrides, and validation that names the field.

    ppo: {learning_rate: 1.0e-4}     -> root.ppo.learning_rate
    --set ppo.learning_rate=1e-4     -> the same field
    --set learning_rate=1e-4         -> the same, when no other section has that field name

A config dataclass may define `problems() -> list[str]`, each text starting with the field's
name; `check` prefixes the section, so a bad value reads `ppo.batch_size must be >= 1`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from rlhf.config.fields import coerce_value, field_types, unknown_field
from rlhf.config.yaml_text import load_plain_yaml
from rlhf.logs import quote


def load_yaml_mapping(text: str, what: str, max_bytes: int | None = None) -> dict[str, Any]:
    """`text` parsed as YAML (never opened as a path: callers read files); a mapping or {}.

    Plain data only (no anchors or aliases, bounded depth: rlhf.config.yaml_text); with
    `max_bytes`, longer text is refused before it is parsed."""
    if max_bytes is not None and len(text.encode()) > max_bytes:
        raise ValueError(f"{what} is {len(text.encode())} bytes, above the cap of {max_bytes}")
    data = load_plain_yaml(text, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        hint = " (a file path? pass the file's text)" if isinstance(data, str) else ""
        raise ValueError(
            f"{what} must be a mapping of section: {{field: value}}, got {quote(data)}{hint}"
        )
    return data


def sections(root: object) -> list[str]:
    """The fields of `root` that are themselves config dataclasses."""
    return [
        f.name for f in dataclasses.fields(root) if dataclasses.is_dataclass(getattr(root, f.name))
    ]


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def set_field(obj: object, name: str, raw: Any, where: str = "") -> None:
    """obj.name = raw converted to the field's type; ValueError naming `where.name` if bad."""
    types_ = field_types(type(obj))
    if name not in types_:
        raise unknown_field(where or type(obj).__name__, name, types_)
    setattr(obj, name, coerce_value(raw, types_[name], _path(where, name)))


def apply_mapping(obj: object, data: Mapping[str, Any], where: str = "") -> None:
    """Sets `obj`'s fields from a (YAML) mapping; nested mappings fill sections."""
    section_names = sections(obj)
    for key, raw in data.items():
        key = str(key)
        if key in section_names:
            if raw is None:
                continue
            if not isinstance(raw, Mapping):
                raise ValueError(f"{_path(where, key)}: a section is a mapping, got {quote(raw)}")
            apply_mapping(getattr(obj, key), raw, _path(where, key))
        else:
            set_field(obj, key, raw, where)


def parse_override(item: str) -> tuple[str, str]:
    """ "a.b=v" -> ("a.b", "v"); dashes in the key read as underscores."""
    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise ValueError(
            f"override {quote(item)}: expected KEY=VALUE (e.g. ppo.learning_rate=1e-4)"
        )
    return key, raw.strip()


def _owner(root: object, key: str) -> tuple[object, str, str]:
    """The object holding field `key` ("section.field" or a name unique across sections)."""
    *parents, name = key.split(".")
    obj, where = root, ""
    for part in parents:
        if part not in sections(obj):
            raise unknown_field(where or "config", part, sections(obj))
        obj, where = getattr(obj, part), _path(where, part)
    if name in sections(obj):
        raise ValueError(f"{_path(where, name)} is a section; set one of its fields ({name}.FIELD)")
    if parents or name in field_types(type(obj)):
        return obj, name, where
    owners = [s for s in sections(root) if name in field_types(type(getattr(root, s)))]
    if len(owners) > 1:
        raise ValueError(
            f"{quote(name)} is ambiguous; write one of " + ", ".join(f"{s}.{name}" for s in owners)
        )
    if not owners:
        qualified = {
            n: f"{s}.{n}" for s in sections(root) for n in field_types(type(getattr(root, s)))
        }
        close = difflib.get_close_matches(name, qualified, n=3)
        hint = f"; did you mean {', '.join(qualified[c] for c in close)}?" if close else ""
        raise ValueError(f"config: unknown field {quote(name)}{hint}")
    return getattr(root, owners[0]), name, owners[0]


def apply_overrides(root: object, overrides: Iterable[str]) -> None:
    """Applies `key=value` overrides in order (a later one wins)."""
    for item in overrides:
        key, raw = parse_override(item)
        obj, name, where = _owner(root, key)
        set_field(obj, name, raw, where)


def problems(obj: object, where: str = "") -> list[str]:
    """Every problem `obj` and its sections report, each prefixed with its section path; a
    non-finite float in any field is one (NaN slips through every range comparison)."""
    found = [_path(where, p) for p in getattr(obj, "problems", lambda: [])()]
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                found.append(_path(where, f"{f.name} must be a finite number, got {value}"))
    for name in sections(obj):
        found += problems(getattr(obj, name), _path(where, name))
    return found


def check(obj: object, what: str) -> None:
    """Raises ValueError listing every problem at once (e.g. `ppo.batch_size must be >= 1`)."""
    found = problems(obj)
    if found:
        raise ValueError(f"invalid {what}:\n  " + "\n  ".join(found))
