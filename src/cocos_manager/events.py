"""Fan-out of manager events and agent messages to any number of Events subscribers.

Publishing never waits: each subscriber has a bounded queue, and a subscriber that falls
behind loses messages (counted, and logged once per burst) instead of slowing Run, Stop,
QEMU supervision or the other subscribers. The original used an unbuffered channel, so a
Run with nobody reading blocked forever (SPEC defect 8).

Agent connections are the one producer that can wait: `wait_for_room` holds an agent back
while a subscriber that is still reading has a backlog, so a burst from an agent reaches the
subscribers at the pace they take it instead of overflowing their queues. A subscriber that
has stopped reading does not hold anyone back; it loses messages as before.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.api import manager_pb2 as pb
from cocos_manager.logging import get_logger

DEFAULT_QUEUE_SIZE = 4096
MANAGER_ORIGINATOR = "manager"
STALLED_AFTER = 1.0
"""Seconds with messages waiting and none taken, after which a subscriber is taken to have
stopped reading and no longer holds agents back."""
_ROOM_POLL = 0.001
# Queue fill that holds an agent back, and that lets it go: the gap spares it a wait per message.
_HOLD_ABOVE, _RELEASE_ABOVE = 0.5, 0.25

_log = get_logger()


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def manager_event(
    computation_id: str, event_type: str, status: str, details: dict[str, Any] | None = None
) -> pb.ClientStreamMessage:
    """A Manager's own event, shaped as the original's AgentEvent with originator "manager"."""
    return pb.ClientStreamMessage(
        agent_event=pb.AgentEvent(
            event_type=event_type,
            timestamp=_now(),
            computation_id=computation_id,
            details=json.dumps(details, separators=(",", ":")).encode() if details else b"",
            originator=MANAGER_ORIGINATOR,
            status=status,
        )
    )


def log_message(computation_id: str, level: str, message: str) -> pb.ClientStreamMessage:
    return pb.ClientStreamMessage(
        agent_log=pb.AgentLog(
            message=message, computation_id=computation_id, level=level, timestamp=_now()
        )
    )


def computation_of(message: pb.ClientStreamMessage) -> str:
    kind = message.WhichOneof("message")
    if kind == "agent_event":
        return message.agent_event.computation_id
    if kind == "agent_log":
        return message.agent_log.computation_id
    if kind == "run_res":
        return message.run_res.computation_id
    return ""


class Subscription:
    """One Events stream: a bounded queue and what it has lost."""

    __slots__ = ("_bus", "computation_id", "dropped", "keeping_up_at", "queue")

    def __init__(self, bus: EventBus, computation_id: str, size: int) -> None:
        self._bus = bus
        self.computation_id = computation_id
        self.queue: asyncio.Queue[pb.ClientStreamMessage | None] = asyncio.Queue(size)
        self.dropped = 0
        # When it was last seen keeping up: it took a message, or had none waiting.
        self.keeping_up_at = time.monotonic()

    def holds_back(self, computation_id: str, now: float, fill: float) -> bool:
        """Fuller than `fill`, still reading, and interested in this computation's messages."""
        return (
            self.queue.qsize() > self.queue.maxsize * fill
            and now - self.keeping_up_at < STALLED_AFTER
            and self.wants(computation_id)
        )

    def wants(self, computation_id: str) -> bool:
        return not self.computation_id or self.computation_id == computation_id

    def offer(self, message: pb.ClientStreamMessage) -> bool:
        if self.queue.empty():
            self.keeping_up_at = time.monotonic()
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            if self.dropped == 0:
                _log.warning(
                    "events subscriber is too slow: dropping messages",
                    subscriber_filter=self.computation_id or "*",
                )
            self.dropped += 1
            return False
        if self.dropped:
            _log.warning("events subscriber caught up", dropped=self.dropped)
            self.dropped = 0
        return True

    async def __aiter__(self) -> AsyncIterator[pb.ClientStreamMessage]:
        try:
            while (message := await self.queue.get()) is not None:
                self.keeping_up_at = time.monotonic()
                yield message
        finally:
            self._bus.unsubscribe(self)

    def close(self) -> None:
        """Ends the stream after what is queued; makes room for the end marker if needed."""
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class EventBus:
    def __init__(
        self,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self._queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self._on_drop = on_drop
        self.published = 0
        self.dropped = 0
        self._taps: list[Callable[[pb.ClientStreamMessage], None]] = []

    def tap(self, listener: Callable[[pb.ClientStreamMessage], None]) -> Callable[[], None]:
        """Calls `listener` with every message published from now on; returns the undo.

        For a consumer with a bounded buffer of its own (the dial-out stream): it must not
        block nor raise. Unlike a subscription it is not ended by `close`, so that what the
        shutdown itself publishes (VMs stopping) can still be forwarded.
        """
        self._taps.append(listener)
        return lambda: self._taps.remove(listener) if listener in self._taps else None

    def subscribe(self, computation_id: str = "") -> Subscription:
        subscription = Subscription(self, computation_id, self._queue_size)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, message: pb.ClientStreamMessage) -> None:
        """Never blocks and never raises: callers are Run, Stop and QEMU supervision."""
        self.published += 1
        for listener in self._taps:
            listener(message)
        computation_id = computation_of(message)
        lost = 0
        for subscription in self._subscribers:
            if subscription.wants(computation_id) and not subscription.offer(message):
                lost += 1
        if lost:
            self.dropped += lost
            if self._on_drop is not None:
                self._on_drop(lost)

    async def wait_for_room(self, computation_id: str) -> None:
        """For producers that can wait (agent connections): returns at once unless a subscriber
        that is still reading has a backlog of this computation's messages (over half its
        queue), then once it has worked most of it off (down to a quarter) or stopped reading.
        Polls only while held back; costs nothing otherwise."""
        if not self._held_back(computation_id, _HOLD_ABOVE):
            return
        # A poll rather than an Event: a subscriber also stops holding back by going quiet,
        # which nothing signals. It only runs while held back, a millisecond at a time.
        while self._held_back(computation_id, _RELEASE_ABOVE):  # noqa: ASYNC110
            await asyncio.sleep(_ROOM_POLL)

    def _held_back(self, computation_id: str, fill: float) -> bool:
        now = time.monotonic()
        return any(s.holds_back(computation_id, now, fill) for s in self._subscribers)

    def close(self) -> None:
        for subscription in list(self._subscribers):
            subscription.close()
