"""A config dataclass's fields: their docstrings, and values converted to their types.

Field docstrings are read from the class's source, as CleanRL/tyro do: the string literal under
an annotated assignment documents that field. Values come from YAML (already typed), from the
command line or an environment variable (strings); both are converted here, once.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any

from rlhf.config.yaml_text import load_plain_yaml
from rlhf.logs import quote

_TRUE = ("1", "true", "yes", "on", "y", "t")
_FALSE = ("0", "false", "no", "off", "n", "f")
_NONE = ("none", "null", "~", "")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (whitespace collapsed), base classes first; {} without source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
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


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, for the dataclass `cls` (init fields only)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def split_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...] / X | None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def unknown_field(where: str, name: str, known: typing.Iterable[str]) -> ValueError:
    """The error for a field that does not exist, suggesting the closest names."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    return ValueError(f"{where}: unknown field {quote(name)}{hint}")


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """`value` (a CLI/override/env string or a YAML value) converted to a field's type:
    bool (true/false/yes/no/on/off/1/0), int, float, str, None for optional fields
    (none/null), lists as "a,b" or "[a, b]". Floats must be finite. Raises ValueError naming
    `where` (e.g. `ppo.batch_size`) and the reason; the value is quoted cut to a short prefix."""
    tp, optional = split_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE):
        if optional:
            return None
        raise ValueError(f"{where} cannot be None")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{where} must be a boolean (true/false), got {quote(value)}")
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where} must be an integer, got {quote(value)}")
        try:
            return int(value)
        except (ValueError, TypeError):
            raise ValueError(f"{where} must be an integer, got {quote(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {quote(value)}")
        try:
            number = float(value)
        except (ValueError, TypeError):
            raise ValueError(f"{where} must be a number, got {quote(value)}") from None
        if not math.isfinite(number):  # NaN passes every `<` check: refused here, once
            raise ValueError(f"{where} must be a finite number, got {quote(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {quote(value)}")
        return value
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            text = value.strip()
            value = load_plain_yaml(text, where) if text.startswith("[") else text.split(",")
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {quote(value)}")
        items = [str(v).strip() for v in value]
        return [v for v in items if v]
    raise TypeError(f"{where}: unsupported field type {tp}")
