"""Per-VM rate limit of QEMU console lines in the daemon's log (ConsoleLogLimiter)."""

from __future__ import annotations

from cocos_manager.config.settings import ServiceSettings
from cocos_manager.events.console_limit import ConsoleLogLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_and_a_count_of_the_rest() -> None:
    clock = Clock()
    limiter = ConsoleLogLimiter(per_second=10, burst=5, clock=clock)
    allowed = [limiter.allow() for _ in range(1000)]  # a chatty guest, all at once
    assert allowed.count(True) == 5
    assert limiter.suppressed_total == 995
    assert limiter.suppressed_note() == "995 console lines suppressed"
    assert limiter.last_suppressed == 995
    assert limiter.suppressed_note() is None  # said once
    clock.now += 0.5  # half a second: five more lines
    assert [limiter.allow() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 60  # a quiet minute refills only up to the burst
    assert [limiter.allow() for _ in range(6)] == [True] * 5 + [False]
    assert limiter.suppressed_note() == "2 console lines suppressed"
    assert limiter.suppressed_total == 997


def test_zero_means_no_limit() -> None:
    limiter = ConsoleLogLimiter(per_second=0, burst=1)
    assert all(limiter.allow() for _ in range(10_000))
    assert limiter.suppressed_note() is None


def test_settings_defaults() -> None:
    limiter = ConsoleLogLimiter.from_settings(ServiceSettings(), clock=Clock())
    assert [limiter.allow() for _ in range(201)].count(True) == 200
