"""JSON-line logs with the original's keys: {"level":"info","message":"...","ts":"<RFC 3339 UTC>"}.

Operators grep and ship these lines; tools written for the Go daemon read these three keys.
MANAGER_LOG_FORMAT=text writes the same fields for a person at a terminal instead:
`<ts> <level> <message> key=value ...` (docs/decisions.md, "Text logs").
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from cocos_manager.config import LogFormat, LogLevel

_LEVELS = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}
_NAMES = {"warning": "warn", "critical": "error", "exception": "error"}


def _original_keys(_: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Puts level, message and ts first, in the original's order and spelling."""
    level = event.pop("level", method)
    ordered: EventDict = {
        "level": _NAMES.get(level, level),
        "message": event.pop("event", ""),
        "ts": event.pop("ts"),
    }
    ordered.update(event)
    return ordered


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False)


_BARE = re.compile(r"[A-Za-z0-9_.:/@+,-]+")  # a value shown without quotes in text lines


def _text_value(value: Any) -> str:
    """Bare when it is one plain word; else as JSON, so spaces, quotes and control characters
    (a guest's console text) stay on one line and visible."""
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return _dumps(value)


def _render_text(_: WrappedLogger, __: str, event: EventDict) -> str:
    """`2026-01-02T03:04:05.678Z info  message key=value ...`: the JSON line's fields, in its
    order, for a person reading a terminal."""
    ts = str(event.pop("ts", ""))
    ts = ts[:23] + "Z" if ts.endswith("+00:00") or ts.endswith("Z") else ts
    level, message = str(event.pop("level", "")), event.pop("message", "")
    text = message if isinstance(message, str) else _dumps(message)
    head = f"{ts} {level:<5} {_CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)}"
    return " ".join([head, *(f"{key}={_text_value(value)}" for key, value in event.items())])


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def configure_logging(
    level: LogLevel = LogLevel.INFO,
    stream: TextIO | None = None,
    *,
    log_format: LogFormat = LogFormat.JSON,
) -> None:
    """Called once at start; before that, structlog's defaults apply (tests, library use)."""
    renderer: Any = (
        _render_text
        if log_format is LogFormat.TEXT
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _original_keys,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger(**bound)
