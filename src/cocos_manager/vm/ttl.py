"""When a computation's TTL stops it, as a wall-clock time that survives a daemon restart.

The deadline is kept as seconds since the epoch (in the VM record, and in List's
`expires_at`), not as a monotonic reading: a restarted daemon re-arms it from the record.
A deadline already past when the daemon comes back stops the VM at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

STOP_REASON = "ttl"
"""`reason` in the details of the vm-stop events of a TTL stop."""


def expires_at(ttl: float | None, now: float | None = None) -> float | None:
    """The deadline of a TTL counted from `now` (when Run answered); None = no TTL."""
    if ttl is None:
        return None
    return (time.time() if now is None else now) + ttl


def arm(deadline: float, on_expiry: Callable[[], object]) -> asyncio.TimerHandle:
    """Calls `on_expiry` on the running loop at `deadline` (wall clock), at once if past.
    Cancel the handle when the VM ends otherwise (Stop, exit)."""
    delay = max(0.0, deadline - time.time())
    return asyncio.get_running_loop().call_later(delay, on_expiry)


def stop_details(deadline: float) -> dict[str, object]:
    """Details of the vm-stop `starting` event of a TTL stop."""
    return {"reason": STOP_REASON, "expires_at": round(deadline, 3)}
