"""JSON-line logs with the original's keys: {"level":"info","message":"...","ts":"<RFC 3339 UTC>"}.

Operators grep and ship these lines; tools written for the Go daemon read these three keys.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from cocos_manager.config import LogLevel

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


def configure_logging(level: LogLevel = LogLevel.INFO, stream: TextIO | None = None) -> None:
    """Called once at start; before that, structlog's defaults apply (tests, library use)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _original_keys,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger(**bound)
