"""Command-line flags generated from a config dataclass, each also settable as RLHF_* variable.

Every field `some_name` becomes `--some-name`, whose default comes from `RLHF_SOME_NAME` when
that is set (containers and Kubernetes set env vars), else from the dataclass. A flag on the
command line wins over the variable, which wins over the default. Help text is the field's
docstring, its default and its variable. The prefix keeps clear of the `<SERVICE>_PORT`
variables Kubernetes injects.

Field metadata refines a flag: `choices` (allowed values) and `group` (a help section title).
A field whose type is a dataclass contributes that class's fields, flat (no prefix).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from rlhf.config.fields import coerce_value, field_docs, field_types, split_optional
from rlhf.defaults import ENV_PREFIX

T = TypeVar("T")


def env_name(flag: str) -> str:
    """--some-name -> RLHF_SOME_NAME."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_env_argument(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """parser.add_argument(flag, ...) whose default comes from RLHF_<FLAG> when that is set.

    For the few hand-written flags of client commands; a service's flags come from its config
    dataclass (`add_dataclass_arguments`)."""
    name = env_name(flag)
    if name in os.environ:
        raw = os.environ[name]
        if kwargs.get("action") == "store_true":
            kwargs["default"] = coerce_value(raw, bool, name)
        else:  # a string default goes through `type` when parsed: a bad value is a usage error
            kwargs["default"] = raw
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {name}]".strip()
    parser.add_argument(flag, **kwargs)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse `type=`: an int no smaller than `minimum` (a usage error below it)."""

    def convert(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    convert.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return convert


def _converter(annotation: Any, where: str) -> Any:
    """argparse `type=`: the field's own conversion, its error shown as argparse's message."""

    def convert(text: str) -> Any:
        try:
            return coerce_value(text, annotation, where)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = where
    return convert


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    if value == "":
        return "empty"
    return "none" if value is None else str(value)


def _default(field: dataclasses.Field, overrides: Mapping[str, Any]) -> Any:
    if field.name in overrides:
        return overrides[field.name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"config field {field.name!r} needs a default to become a flag")


def _switch(doc: str, default: bool, env: str) -> dict[str, Any]:
    """A boolean field: `--flag` (store_true), or `--flag/--no-flag` when it defaults to true."""
    if env in os.environ:
        default = coerce_value(os.environ[env], bool, env)
    action = argparse.BooleanOptionalAction if default else "store_true"
    return {"action": action, "default": default, "help": f"{doc} (default: {default}) [env {env}]"}


def _option(
    field: dataclasses.Field, annotation: Any, doc: str, default: Any, env: str
) -> dict[str, Any]:
    """A valued field: converted by the field's type, its choices (if any) shown and enforced."""
    flag = "--" + field.name.replace("_", "-")
    shown = os.environ[env] if env in os.environ else _shown(default)
    kwargs: dict[str, Any] = {
        "type": _converter(annotation, f"{flag} ({env})"),
        # A string default goes through `type` at parse time: a bad variable is reported like
        # a bad flag, not as a traceback while the parser is built.
        "default": os.environ.get(env, default),
        "help": f"{doc} (default: {shown}) [env {env}]",
    }
    if "choices" in field.metadata:
        kwargs["choices"] = field.metadata["choices"]
    else:  # argparse shows the choices instead
        kwargs["metavar"] = field.name.upper()
    return kwargs


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: Mapping[str, Any] | None = None,
    exclude: Collection[str] = (),
) -> None:
    """Adds `--field-name` for every init field of dataclass `cls` (dest: the field name).

    `defaults` replaces some fields' defaults (e.g. each service's own port). Booleans are
    switches: `--flag` (and `--no-flag` when the default is true). A field whose type is a
    dataclass adds its own fields' flags, flat (ServerConfig.tls gives --tls-cert), under its
    `group`. Fields named in `exclude` (at any depth) get no flag."""
    _add_fields(parser, cls, defaults or {}, frozenset(exclude), None)


def _group(parser: argparse.ArgumentParser, title: str) -> Any:
    """The parser's help section `title`, made on first use (shared by several classes)."""
    for group in parser._action_groups:  # argparse keeps no public index of its groups
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def _add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: Mapping[str, Any],
    exclude: frozenset[str],
    inherited_group: str | None,
) -> None:
    docs, types_ = field_docs(cls), field_types(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.name in exclude:
            continue
        title = field.metadata.get("group", inherited_group)
        annotation = split_optional(types_[field.name])[0]
        if dataclasses.is_dataclass(annotation):
            _add_fields(parser, annotation, defaults, exclude, title)
            continue
        flag = "--" + field.name.replace("_", "-")
        env, doc = env_name(flag), docs.get(field.name, "")
        default = _default(field, defaults)
        if annotation is bool:
            kwargs = _switch(doc, default, env)
        else:
            kwargs = _option(field, types_[field.name], doc, default, env)
        kwargs["help"] = kwargs["help"].replace("%", "%%")
        (_group(parser, title) if title else parser).add_argument(flag, dest=field.name, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The `cls` instance that parsed `add_dataclass_arguments` flags describe (validated by the
    class's own __post_init__). Nested dataclass fields are built from the same flat flags;
    a field without a flag keeps its default."""
    values: dict[str, Any] = {}
    types_ = field_types(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not field.init:
            continue
        annotation = split_optional(types_[field.name])[0]
        if dataclasses.is_dataclass(annotation):
            values[field.name] = from_args(annotation, args)  # type: ignore[arg-type]
        elif hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
    return cls(**values)
