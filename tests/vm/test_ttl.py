"""A Run's TTL: the request's `ttl` (a Go duration) or MANAGER_DEFAULT_TTL."""

from __future__ import annotations

import asyncio
import time

import pytest

from cocos_manager.agent.manifest import effective_ttl, parse_ttl, validate_run_request
from cocos_manager.config.settings import SettingsError, load_settings
from cocos_manager.errors import InvalidArgumentError
from cocos_manager.vm import ttl
from tests.support.harness import run_request


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20s", 20.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("250ms", 0.25), ("2562047h", 2562047 * 3600.0)],
)  # fmt: skip
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("20", "not a duration"),  # Go wants a unit
        ("soon", "not a duration"),
        (" 20s", "not a duration"),
        ("20S", "not a duration"),
        ("0", "must be positive"),
        ("0s", "must be positive"),
        ("-1m", "must be positive"),
        ("2562048h", "out of range"),  # beyond Go's int64 nanoseconds
    ],
)
def test_bad_ttls_name_the_field(text: str, why: str) -> None:
    request = run_request("c")
    request.ttl = text
    with pytest.raises(InvalidArgumentError, match=rf"^ttl: .*{why}"):
        validate_run_request(request)


def test_effective_ttl_is_the_requests_else_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    request = run_request("c")
    assert effective_ttl(request, load_settings()) is None  # nothing set: no TTL
    monkeypatch.setenv("MANAGER_DEFAULT_TTL", "2h")
    settings = load_settings()
    assert effective_ttl(request, settings) == 7200.0
    request.ttl = "20s"
    assert effective_ttl(request, settings) == 20.0


@pytest.mark.parametrize(
    ("value", "seconds"), [("", None), ("0", None), ("0s", None), ("90s", 90.0)]
)
def test_default_ttl_setting(
    monkeypatch: pytest.MonkeyPatch, value: str, seconds: float | None
) -> None:
    monkeypatch.setenv("MANAGER_DEFAULT_TTL", value)
    assert load_settings().service.DEFAULT_TTL == seconds


@pytest.mark.parametrize("value", ["-5s", "tomorrow", "10"])
def test_a_bad_default_ttl_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MANAGER_DEFAULT_TTL", value)
    with pytest.raises(SettingsError, match=r"^invalid value for MANAGER_DEFAULT_TTL: "):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MANAGER_LOG_HISTORY_LINES", "0"),
        ("MANAGER_LOG_HISTORY_BYTES", "-1"),
        ("MANAGER_LOG_RETENTION", "-1s"),
        ("MANAGER_LOG_RETAINED_VMS", "-1"),
        ("MANAGER_LOG_RETENTION", "1 hour"),
    ],
)
def test_bad_log_history_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"^invalid value for {name}: "):
        load_settings()


def test_log_history_defaults() -> None:
    service = load_settings().service
    assert service.LOG_HISTORY_LINES == 1000
    assert service.LOG_HISTORY_BYTES == 256 * 1024
    assert service.LOG_RETENTION == 3600.0
    assert service.LOG_RETAINED_VMS == 50
    assert service.DEFAULT_TTL is None


async def test_an_armed_ttl_fires_at_its_deadline_and_a_past_one_at_once() -> None:
    assert ttl.expires_at(None) is None
    assert ttl.expires_at(20.0, now=1000.0) == 1020.0
    fired: list[str] = []
    done = asyncio.Event()

    def fire(name: str) -> None:
        fired.append(name)
        if len(fired) == 2:
            done.set()

    deadline = ttl.expires_at(0.2)
    assert deadline is not None
    ttl.arm(deadline, lambda: fire("soon"))
    ttl.arm(time.time() - 3600, lambda: fire("past"))  # e.g. expired while the daemon was down
    cancelled = ttl.arm(time.time() + 0.1, lambda: fire("cancelled"))
    cancelled.cancel()
    await asyncio.wait_for(done.wait(), 5)
    assert fired == ["past", "soon"]
    assert time.time() >= deadline
    assert ttl.stop_details(1020.5) == {"reason": "ttl", "expires_at": 1020.5}
