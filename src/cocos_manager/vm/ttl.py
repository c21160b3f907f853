"""When a computation's TTL stops it, as a wall-clock time that survives a daemon restart.

The deadline is kept as seconds since the epoch (in the VM record, and in List's
`expires_at`), not as a monotonic reading: a restarted daemon re-arms it from the record.
A deadline already past when the daemon comes back stops the VM at once.

It also fires by the wall clock. asyncio's timers run on the monotonic clock, which a clock
step (NTP correcting a host that booted with a wrong time, `date -s`) does not move: a deadline
turned once into a monotonic delay would fire an hour early or late after a one-hour step, at
another time than `expires_at` says. So the alarms of one event loop share one timer that
wakes at the earliest deadline, but at least every CHECK_INTERVAL seconds, and fires whatever
the wall clock says is due: after a step a VM stops within CHECK_INTERVAL of its `expires_at`
(docs/decisions.md, "TTL deadlines and clock steps").
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable

STOP_REASON = "ttl"
"""`reason` in the details of the vm-stop events of a TTL stop."""

CHECK_INTERVAL = 1.0
"""Longest sleep while an alarm is armed: how late a VM may stop after a forward clock step.
One wake-up a second for the whole daemon (not per VM), and none while no TTL is armed."""


def expires_at(ttl: float | None, now: float | None = None) -> float | None:
    """The deadline of a TTL counted from `now` (when Run answered); None = no TTL."""
    if ttl is None:
        return None
    return (time.time() if now is None else now) + ttl


class Alarm:
    """One armed deadline. `cancel()` when the VM ends otherwise (Stop, exit)."""

    __slots__ = ("_clock", "callback", "deadline")

    def __init__(self, clock: WallClockAlarms, deadline: float, callback: Callable[[], object]):
        self._clock = clock
        self.deadline = deadline
        self.callback = callback

    def cancel(self) -> None:
        self._clock.discard(self)


class WallClockAlarms:
    """The alarms of one event loop, fired when `now()` (the wall clock) reaches them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        now: Callable[[], float] = time.time,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self._loop = loop
        self._now = now
        self._check = check_interval
        self._alarms: set[Alarm] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._due_at = 0.0  # loop.time() of the timer's wake-up

    def arm(self, deadline: float, callback: Callable[[], object]) -> Alarm:
        alarm = Alarm(self, deadline, callback)
        self._alarms.add(alarm)
        self._schedule()
        return alarm

    def discard(self, alarm: Alarm) -> None:
        self._alarms.discard(alarm)
        if not self._alarms and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return len(self._alarms)

    def _schedule(self) -> None:
        """The one timer: at the earliest deadline by the wall clock read now, at most
        CHECK_INTERVAL away, and never later than it already was."""
        if not self._alarms:
            return
        earliest = min(alarm.deadline for alarm in self._alarms)
        delay = min(self._check, max(0.0, earliest - self._now()))
        wake = self._loop.time() + delay
        if self._timer is not None:
            if self._due_at <= wake:
                return
            self._timer.cancel()
        self._due_at = wake
        self._timer = self._loop.call_at(wake, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._now()
        due = sorted(
            (alarm for alarm in self._alarms if alarm.deadline <= now), key=lambda a: a.deadline
        )
        for alarm in due:  # in deadline order, each in its own callback (one raising stops none)
            self._alarms.discard(alarm)
            self._loop.call_soon(alarm.callback)
        self._schedule()


_ALARMS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WallClockAlarms] = (
    weakref.WeakKeyDictionary()
)


def alarms() -> WallClockAlarms:
    """The running loop's alarms (each test's loop has its own)."""
    loop = asyncio.get_running_loop()
    found = _ALARMS.get(loop)
    if found is None:
        found = _ALARMS[loop] = WallClockAlarms(loop)
    return found


def arm(deadline: float, on_expiry: Callable[[], object]) -> Alarm:
    """Calls `on_expiry` on the running loop once the wall clock reaches `deadline` (on the
    next loop iteration if it already has). Cancel the alarm when the VM ends otherwise."""
    return alarms().arm(deadline, on_expiry)


def stop_details(deadline: float) -> dict[str, object]:
    """Details of the vm-stop `starting` event of a TTL stop."""
    return {"reason": STOP_REASON, "expires_at": round(deadline, 3)}
