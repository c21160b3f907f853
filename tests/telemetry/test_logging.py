"""Log lines keep the original's keys and honour MANAGER_LOG_LEVEL."""

from __future__ import annotations

import io
import json
from datetime import datetime

import pytest

from cocos_manager.config.choices import LogLevel
from cocos_manager.telemetry.logging import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _reset() -> None:
    yield
    import structlog

    structlog.reset_defaults()


def lines(level: LogLevel) -> list[dict[str, object]]:
    out = io.StringIO()
    configure_logging(level, stream=out)
    log = get_logger()
    log.debug("d")
    log.info("i", computation_id="c1")
    log.warning("w")
    log.error("e")
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_keys_and_order() -> None:
    first = lines(LogLevel.DEBUG)[1]
    assert list(first)[:3] == ["level", "message", "ts"]
    assert first["level"] == "info" and first["message"] == "i" and first["computation_id"] == "c1"
    ts = str(first["ts"])
    assert ts.endswith("Z")
    assert datetime.fromisoformat(ts.replace("Z", "+00:00")).utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    ("level", "seen"),
    [
        (LogLevel.DEBUG, ["debug", "info", "warn", "error"]),
        (LogLevel.INFO, ["info", "warn", "error"]),
        (LogLevel.WARN, ["warn", "error"]),
        (LogLevel.ERROR, ["error"]),
    ],
)
def test_level_filter(level: LogLevel, seen: list[str]) -> None:
    assert [line["level"] for line in lines(level)] == seen
