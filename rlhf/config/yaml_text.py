"""YAML text from untrusted callers: plain data only, no aliases, bounded size and depth.

PyYAML's safe loader builds no objects but still expands aliases: a 431-byte document of nested
`&a [*b, *b, ...]` anchors grows into hundreds of megabytes. Config files never need anchors,
so this loader refuses the first anchor or alias it scans, before anything is built, and caps
how deep collections nest (the composer recurses per level). Errors carry the line and column
and never the document's text.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 20
"""Deepest nesting of mappings and lists a config may have (a run config uses 2)."""


class YamlRefused(ValueError):
    """YAML text that is malformed or uses a refused feature; says where (line, column)."""


def _where(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases, and with a depth limit."""

    def fetch_anchor(self) -> None:
        raise YamlRefused(
            f"{_where(self.get_mark())}: YAML anchors and aliases (&name, *name) are not "
            "accepted; write the values out"
        )

    fetch_alias = fetch_anchor

    def compose_node(self, parent: Any, index: Any) -> Any:
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise YamlRefused(
                f"{_where(self.peek_event().start_mark)}: nested deeper than {MAX_DEPTH} levels"
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


def load_plain_yaml(text: str, what: str) -> Any:
    """`text` parsed as YAML into plain data (dict, list, str, numbers, bool, None).

    Raises YamlRefused (a ValueError) naming `what`, the line and the column: for syntax
    errors, anchors/aliases, tags that build objects, and nesting deeper than MAX_DEPTH."""
    loader = None
    try:
        loader = _PlainLoader(text)  # its reader refuses NUL and other control characters here
        return loader.get_single_data()
    except YamlRefused as err:
        raise YamlRefused(f"{what}: {err}") from None
    except yaml.MarkedYAMLError as err:
        problem = (err.problem or err.context or "invalid YAML")[:120]
        raise YamlRefused(
            f"{what} is not valid YAML at {_where(err.problem_mark)}: {problem}"
        ) from None
    except (yaml.YAMLError, ValueError) as err:  # unmarked (e.g. an int of 5000 digits)
        raise YamlRefused(f"{what} is not valid YAML: {str(err)[:120]}") from None
    finally:
        if loader is not None:
            loader.dispose()
