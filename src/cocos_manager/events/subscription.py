"""One Events subscriber's stream: the replay it starts with, then a queue bounded in messages
and bytes that drops (and later says how many) rather than wait, and the per-computation backlog
that the bus's pacing of agents looks at."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

from cocos_manager.events.messages import EVENTS_LOST, manager_event
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry import get_logger

# Backlog of one computation (as a share of the queue, in messages or bytes) that holds its
# agent back, and that lets it go: the gap spares the agent a wait per message.
HOLD_ABOVE, RELEASE_AT = 0.5, 0.25

_log = get_logger()


class Published:
    """A published message with what the bus needs to know about it, computed once."""

    __slots__ = ("computation_id", "message", "seq", "size")

    def __init__(self, message: pb.ClientStreamMessage, computation_id: str, size: int) -> None:
        self.message = message
        self.computation_id = computation_id
        self.size = size
        self.seq = message.seq


class Owner(Protocol):
    """What a subscription tells the bus it belongs to (the bus, seen from here: the import
    points from bus.py to this module only)."""

    def drained(self, computation_id: str, subscription: Subscription) -> None:
        """One of this computation's messages left the queue: an agent held back may go on."""

    def backlogged(self, computation_id: str) -> None:
        """This computation's backlog here is over HOLD_ABOVE: its agents may have to wait."""

    def unsubscribe(self, subscription: Subscription) -> None: ...


class Subscription:
    """One Events stream: what it replays first, a queue bounded in messages and bytes, its
    backlog per computation (what pacing looks at), and what it has lost."""

    __slots__ = (
        "_backlog",
        "_bus",
        "_bytes",
        "_closed",
        "_hold_bytes",
        "_hold_messages",
        "_items",
        "_lost_last",
        "_lost_since",
        "_max_bytes",
        "_max_messages",
        "_ready",
        "_replay",
        "computation_id",
        "dropped",
        "lost_total",
        "paces",
    )

    def __init__(
        self,
        bus: Owner,
        computation_id: str,
        max_messages: int,
        max_bytes: int,
        replay: list[pb.ClientStreamMessage] | None = None,
    ) -> None:
        self._bus = bus
        self.computation_id = computation_id
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        # fill() > HOLD_ABOVE, without dividing, for the check on every queued message
        self._hold_messages = max_messages * HOLD_ABOVE
        self._hold_bytes = max_bytes * HOLD_ABOVE
        self._items: deque[Published] = deque()
        self._bytes = 0
        # computation id -> [queued messages, queued bytes]
        self._backlog: dict[str, list[int]] = {}
        self._ready = asyncio.Event()
        self._closed = False
        self._replay: deque[pb.ClientStreamMessage] = deque(replay or ())
        self.dropped = 0  # lost in the current burst; reported when it catches up
        self._lost_since = 0  # seq just before the burst's first lost message
        self._lost_last = 0  # seq of the burst's last lost message
        self.lost_total = 0
        self.paces = True  # False after it kept an agent waiting too long; True once drained

    # -- queue ------------------------------------------------------------------------------

    def qsize(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def wants(self, computation_id: str) -> bool:
        """Its computation's messages, and the manager-wide ones (no computation id: the
        shutdown notices) whatever its filter."""
        return not self.computation_id or computation_id in (self.computation_id, "")

    def offer(self, item: Published, past_bounds: bool = False) -> bool:
        if self._closed:
            return True
        if (
            not past_bounds
            and self._items
            and (
                len(self._items) >= self._max_messages or self._bytes + item.size > self._max_bytes
            )
        ):
            if self.dropped == 0:
                _log.warning(
                    "events subscriber is too slow: dropping messages",
                    subscriber_filter=self.computation_id or "*",
                )
                self._lost_since = item.seq - 1
            self.dropped += 1
            self._lost_last = item.seq
            self.lost_total += 1
            return False
        if self.dropped:
            self._push(Published(self._lost_notice(), self.computation_id, 0))
        self._push(item)
        return True

    def _lost_notice(self) -> pb.ClientStreamMessage:
        """The events-lost notice of the current burst, which it ends: in front of the next
        message queued, or when the queue drains with nothing after the loss (the loss of a
        computation's last messages, its vm-stop, must be told too)."""
        _log.warning("events subscriber caught up", dropped=self.dropped)
        details = {"lost": self.dropped, "since": self._lost_since, "last": self._lost_last}
        self.dropped = 0
        return manager_event(self.computation_id, EVENTS_LOST, "dropped", details)

    def _push(self, item: Published) -> None:
        self._items.append(item)
        self._bytes += item.size
        backlog = self._backlog.get(item.computation_id)
        if backlog is None:
            backlog = self._backlog[item.computation_id] = [1, item.size]
        else:
            backlog[0] += 1
            backlog[1] += item.size
        if backlog[0] > self._hold_messages or backlog[1] > self._hold_bytes:
            self._bus.backlogged(item.computation_id)
        self._ready.set()

    def _take(self) -> pb.ClientStreamMessage:
        item = self._items.popleft()
        self._bytes -= item.size
        backlog = self._backlog[item.computation_id]
        backlog[0] -= 1
        backlog[1] -= item.size
        if not backlog[0]:
            del self._backlog[item.computation_id]
        if not self._items:
            self.paces = True  # it has caught up: it may pace agents again
        self._bus.drained(item.computation_id, self)
        return item.message

    def fill(self, computation_id: str) -> float:
        """How much of the queue this computation's messages take (messages or bytes, the
        larger share)."""
        backlog = self._backlog.get(computation_id)
        if backlog is None:
            return 0.0
        return max(backlog[0] / self._max_messages, backlog[1] / self._max_bytes)

    def holds_back(self, computation_id: str, fill: float) -> bool:
        return self.paces and not self._closed and self.fill(computation_id) > fill

    # -- stream -----------------------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[pb.ClientStreamMessage]:
        try:
            while self._replay:
                yield self._replay.popleft()
            while True:
                if not self._items:
                    if self.dropped:
                        yield self._lost_notice()
                        continue
                    if self._closed:
                        return
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                yield self._take()
        finally:
            self._bus.unsubscribe(self)

    def close(self) -> None:
        """Ends the stream after what is queued."""
        self._closed = True
        self._ready.set()
