"""Structured (JSON-lines) logs that say which service, run, step, request and weight version.

Every record is one JSON object on stderr: ``{"ts", "level", "service", "msg", ...extra}``.
Pass context with ``extra=``: ``log.info("generated", extra={"weight_version": 3})``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

QUOTE_CHARS = 40
"""How much of a client's text a message or log line repeats (`quote`)."""

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is emitted, not as it was at set-up: where
    stderr is replaced later (a redirect, pytest's capture) records still land, never on a
    closed stream."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers sys.stderr


def setup_logging(service: str, level: str = "INFO") -> logging.Logger:
    """Routes the root logger to JSON lines on stderr tagged with `service`; returns its logger."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' chatter stays out of the service log unless it is a warning.
    for noisy in ("transformers", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"rlhf.{service}")


class ContextLogger(logging.LoggerAdapter):
    """A logger that adds fixed context (e.g. {"run": ...}) to every record's own extra=.

    (The stdlib adapter replaces a call's extra= with its own before Python 3.13.)
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def quote(text: object, limit: int = QUOTE_CHARS) -> str:
    """Client text for an error message or a log line: its repr, cut to `limit` characters and
    followed by its length when longer, so a 1 MB run id costs a short line, not 1 MB a time.
    Other values (a YAML list, a number) are shown by their repr, cut the same way."""
    if not isinstance(text, str):
        shown = repr(text)
        return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown)} characters)"
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
