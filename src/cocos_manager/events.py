"""Fan-out of manager events and agent messages to any number of Events subscribers.

Publishing never waits: each subscriber has a bounded queue, and a subscriber that falls
behind loses messages (counted, and logged once per burst) instead of slowing Run, Stop,
QEMU supervision or the other subscribers. The original used an unbuffered channel, so a
Run with nobody reading blocked forever (SPEC defect 8).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.api import manager_pb2 as pb
from cocos_manager.logging import get_logger

DEFAULT_QUEUE_SIZE = 4096
MANAGER_ORIGINATOR = "manager"

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

    __slots__ = ("_bus", "computation_id", "dropped", "queue")

    def __init__(self, bus: EventBus, computation_id: str, size: int) -> None:
        self._bus = bus
        self.computation_id = computation_id
        self.queue: asyncio.Queue[pb.ClientStreamMessage | None] = asyncio.Queue(size)
        self.dropped = 0

    def wants(self, computation_id: str) -> bool:
        return not self.computation_id or self.computation_id == computation_id

    def offer(self, message: pb.ClientStreamMessage) -> bool:
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
        computation_id = computation_of(message)
        lost = 0
        for subscription in self._subscribers:
            if subscription.wants(computation_id) and not subscription.offer(message):
                lost += 1
        if lost:
            self.dropped += lost
            if self._on_drop is not None:
                self._on_drop(lost)

    def close(self) -> None:
        for subscription in list(self._subscribers):
            subscription.close()
