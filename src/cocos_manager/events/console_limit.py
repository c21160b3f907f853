"""Rate limit of QEMU console lines in the daemon's own log, per VM.

Every line a guest prints on its serial console becomes a log line of the daemon. A chatty or
hostile guest (a boot loop, a kernel printing a warning per packet) can print thousands of
lines a second; journald then rate-limits the whole unit and drops the daemon's own errors
with them. Each VM gets a token bucket: `burst` lines at once, then `per_second`; what is
over is not logged but counted, and the count is logged as one line ("N console lines
suppressed") with the next line that passes, or when the VM ends. Only the log is limited:
Events subscribers still get every line (their queues are bounded on their own).

Used by each VM's output sink, vm/output.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.config import ServiceSettings


class ConsoleLogLimiter:
    """A token bucket of log lines; per_second 0 means no limit."""

    __slots__ = (
        "_burst",
        "_clock",
        "_pending",
        "_per_second",
        "_tokens",
        "_updated",
        "last_suppressed",
        "suppressed_total",
    )

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_second = per_second
        self._burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self._burst)
        self._updated = clock()
        self._pending = 0
        self.last_suppressed = 0
        self.suppressed_total = 0

    @classmethod
    def from_settings(
        cls, service: ServiceSettings, clock: Callable[[], float] = time.monotonic
    ) -> ConsoleLogLimiter:
        return cls(service.CONSOLE_LINES_PER_SECOND, service.CONSOLE_LINES_BURST, clock)

    def allow(self) -> bool:
        """True: log this line. False: it is counted as suppressed."""
        if not self._per_second:
            return True
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._per_second)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self._pending += 1
        self.suppressed_total += 1
        return False

    def suppressed_note(self) -> str | None:
        """The line to log for what was suppressed since the last note, once; else None."""
        if not self._pending:
            return None
        self.last_suppressed, self._pending = self._pending, 0
        return f"{self.last_suppressed} console lines suppressed"
