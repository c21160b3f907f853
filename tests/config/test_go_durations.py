"""Durations parsed as Go's time.ParseDuration parses them (found in review): a fraction
without digits after the point, one sign only, and at most int64 nanoseconds."""

from __future__ import annotations

import pytest

from cocos_manager.config.go_parse import parse_go_duration
from cocos_manager.config.settings import SettingsError, load_settings


@pytest.mark.parametrize(("text", "seconds"), [("1.s", 1.0), ("1.5h", 5400.0), (".5s", 0.5)])
def test_durations_go_accepts(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["+-5s", "--5s", "-+5s", "2562048h", "9999999999999999h", "."])
def test_durations_go_rejects(text: str) -> None:
    """A doubled sign, or more than Go's int64 nanoseconds (about 2562047h), is an error."""
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_largest_go_duration_is_accepted() -> None:
    assert parse_go_duration("2562047h") == 2562047 * 3600.0


def test_stop_timeout_beyond_go_range_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_QEMU_STOP_TIMEOUT", "99999999999h")
    with pytest.raises(SettingsError, match="MANAGER_QEMU_STOP_TIMEOUT"):
        load_settings()
