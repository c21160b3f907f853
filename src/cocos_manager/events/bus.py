"""Fan-out of manager events and agent messages to any number of Events subscribers.

Publishing never waits: each subscriber has a queue bounded in messages and in bytes, and a
subscriber that falls behind loses messages (counted, logged once per burst, and told with an
"events-lost" event when it catches up) instead of slowing Run, Stop, QEMU supervision or the
other subscribers. The original used an unbuffered channel, so a Run with nobody reading
blocked forever.

Sequence numbers and replay: every published message gets `seq`, one more than the last, and
the bus retains the latest ones (bounded in count and bytes). A subscriber that gives `since`
first gets the retained messages after it, then live ones; both are decided in one step on
the event loop, so there is no gap and no duplicate between them. When messages after `since`
are no longer retained, the stream starts with an "events-lost" event saying how many.

Pacing: agent connections are the one producer that can wait. `wait_for_room` holds an agent
back while a subscriber has a backlog of *that agent's computation's* messages (a subscriber
busy with other computations holds it back not at all), for at most `hold_timeout`, and is
woken when that backlog drains: no polling. A subscriber that keeps an agent waiting past
`hold_timeout` stops pacing anyone until it has emptied its queue; meanwhile it loses
messages and the agents go on.

The bus is here; one subscriber's stream is in events/subscription.py, the manager's own
messages in events/messages.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from cocos_manager.errors import ResourceExhaustedError
from cocos_manager.events.messages import EVENTS_LOST, computation_of

# Re-exported: vm/machine.py and service.py import the message constructors and the stream type
# with the bus.
from cocos_manager.events.messages import log_message as log_message
from cocos_manager.events.messages import manager_event as manager_event
from cocos_manager.events.subscription import HOLD_ABOVE, RELEASE_AT, Published
from cocos_manager.events.subscription import Subscription as Subscription
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry import get_logger

if TYPE_CHECKING:
    from cocos_manager.config import ServiceSettings

DEFAULT_QUEUE_SIZE = 4096
DEFAULT_QUEUE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_SUBSCRIBERS = 64
DEFAULT_RETAIN = 10_000
DEFAULT_RETAIN_BYTES = 16 * 1024 * 1024
DEFAULT_HOLD_TIMEOUT = 1.0
_REMEMBERED_EVICTIONS = 10_000
"""Computations whose last evicted message is remembered, to tell a replay filtered on one
computation whether it lost anything."""

_log = get_logger()


class Evictions:
    """What left the retained history, for a replay to tell whether its filter lost anything
    after `since`: for one computation (and the manager-wide messages it gets too), known
    exactly from each one's last eviction; one no longer remembered (more were evicted than
    are remembered) is told of a loss when a forgotten eviction came after `since`. A
    control plane following its own computation is not told of other computations' losses."""

    def __init__(self) -> None:
        # computation id -> seq of its last evicted message, least recently evicted first
        self._last: dict[str, int] = {}
        self.forgot_upto = 0  # the newest eviction forgotten: any computation's, as far as known
        self._last_wide = 0  # of the manager-wide messages: never forgotten

    def note(self, evicted: Published) -> None:
        if not evicted.computation_id:
            self._last_wide = evicted.seq
            return
        last = self._last
        last.pop(evicted.computation_id, None)  # re-inserted last: oldest first
        last[evicted.computation_id] = evicted.seq
        if len(last) > _REMEMBERED_EVICTIONS:
            oldest = next(iter(last))
            self.forgot_upto = max(self.forgot_upto, last.pop(oldest))

    def lost_after(self, computation_id: str, since: int) -> bool:
        if not computation_id or self._last_wide > since:
            return True
        last = self._last.get(computation_id)
        if last is None:
            return self.forgot_upto > since
        return last > since


class EventBus:
    def __init__(
        self,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        on_drop: Callable[[int], None] | None = None,
        *,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
        retain: int = DEFAULT_RETAIN,
        retain_bytes: int = DEFAULT_RETAIN_BYTES,
        hold_timeout: float = DEFAULT_HOLD_TIMEOUT,
        first_seq: int = 1,
    ) -> None:
        """`first_seq`: the daemon starts its numbers at its start time in microseconds
        (`from_settings`), so every run's numbers lie above every earlier run's and a `since`
        from before a restart is recognised; tests start at 1."""
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._max_subscribers = max_subscribers
        self._retain = retain
        self._retain_bytes = retain_bytes
        self._hold_timeout = hold_timeout
        self._subscribers: set[Subscription] = set()
        self._on_drop = on_drop
        self._history: deque[Published] = deque()
        self._history_bytes = 0
        self._evictions = Evictions()
        self._first_seq = first_seq
        self._seq = first_seq - 1
        self._room: dict[str, asyncio.Future[None]] = {}
        # Computations some subscriber may hold back (a subscription adds its computation when
        # a message takes it over HOLD_ABOVE); `pace` removes those nobody holds back.
        self._backlogged: set[str] = set()
        self._ending: set[str] = set()  # computations whose VM is ending: never paced
        self._closed = False
        self._last: pb.ClientStreamMessage | None = None  # close()'s final notice
        self.published = 0
        self.dropped = 0
        self.hold_wakeups = 0
        """How often a held agent was woken to look again: once per drain, not per tick."""
        self.hold_timeouts = 0
        self._taps: list[Callable[[pb.ClientStreamMessage], None]] = []

    def tap(self, listener: Callable[[pb.ClientStreamMessage], None]) -> Callable[[], None]:
        """Calls `listener` with every message published from now on; returns the undo. For a
        consumer with a bounded buffer of its own (the dial-out stream): it must not block nor
        raise. Not ended by `close`, so what the shutdown publishes is still forwarded."""
        self._taps.append(listener)
        return lambda: self._taps.remove(listener) if listener in self._taps else None

    @classmethod
    def from_settings(
        cls, service: ServiceSettings, on_drop: Callable[[int], None] | None = None
    ) -> EventBus:
        """The bus the MANAGER_EVENTS_* settings describe."""
        return cls(
            on_drop=on_drop,
            queue_bytes=service.EVENTS_QUEUE_BYTES,
            max_subscribers=service.EVENTS_MAX_SUBSCRIBERS,
            retain=service.EVENTS_RETAIN,
            retain_bytes=service.EVENTS_RETAIN_BYTES,
            hold_timeout=service.EVENTS_HOLD_TIMEOUT,
            first_seq=int(time.time() * 1_000_000),
        )

    # -- subscribers ------------------------------------------------------------------------

    def subscribe(self, computation_id: str = "", since: int | None = None) -> Subscription:
        """A new stream; with `since`, the retained messages after it come first.

        Synchronous on the loop: nothing can be published between the snapshot of the history
        and the registration, so replay and live messages meet without a gap or a duplicate.
        Raises ResourceExhaustedError beyond MANAGER_EVENTS_MAX_SUBSCRIBERS.
        """
        if self._max_subscribers and len(self._subscribers) >= self._max_subscribers:
            raise ResourceExhaustedError(
                f"Events: {len(self._subscribers)} subscribers already "
                f"(MANAGER_EVENTS_MAX_SUBSCRIBERS={self._max_subscribers})"
            )
        replay = None if since is None else self._replay(computation_id, since)
        last = self._last
        if last is not None and not any(message is last for message in replay or ()):
            replay = [*(replay or ()), last]  # a stream opened after the close learns why
        subscription = Subscription(
            self, computation_id, self._queue_size, self._queue_bytes, replay
        )
        if self._closed:
            subscription.close()
        else:
            self._subscribers.add(subscription)
        return subscription

    def _replay(self, computation_id: str, since: int) -> list[pb.ClientStreamMessage]:
        out: list[pb.ClientStreamMessage] = []
        oldest = self._history[0].seq if self._history else self._seq + 1
        if since == 0:  # everything of this run that is retained
            since = self._first_seq - 1
        if since > self._seq or 0 < since < self._first_seq - 1:
            # Numbers from an earlier run of the daemon (below this run's first), or from
            # nowhere (above its last, e.g. a clock set back between two runs).
            out.append(
                manager_event(
                    computation_id,
                    EVENTS_LOST,
                    "restarted",
                    {"since": since, "last": self._seq},
                )
            )
            since = self._first_seq - 1
        elif since + 1 < oldest and self._evictions.lost_after(computation_id, since):
            lost = oldest - since - 1
            out.append(
                manager_event(computation_id, EVENTS_LOST, "replay", {"lost": lost, "since": since})
            )
        if computation_id:  # its own and the manager-wide messages, as Subscription.wants
            out += (
                item.message
                for item in self._history
                if item.seq > since and item.computation_id in (computation_id, "")
            )
        else:
            out += (item.message for item in self._history if item.seq > since)
        return out

    def backlogged(self, computation_id: str) -> None:
        self._backlogged.add(computation_id)

    def drained(self, computation_id: str, subscription: Subscription) -> None:
        if computation_id in self._room and subscription.fill(computation_id) <= RELEASE_AT:
            self._wake(computation_id)

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        for computation_id in list(self._room):
            self._wake(computation_id)
        for computation_id in list(self._backlogged):
            self._held_back(computation_id)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def last_seq(self) -> int:
        return self._seq

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        message: pb.ClientStreamMessage,
        *,
        past_bounds: bool = False,
        computation_id: str | None = None,
    ) -> None:
        """Never blocks and never raises: callers are Run, Stop and QEMU supervision.
        Sets `message.seq`; the message must not be changed afterwards. `past_bounds`: queued
        even in a full queue (the shutdown's last word, once). `computation_id`: the
        message's own, when the caller has it at hand (agents' messages: one look less)."""
        self._seq += 1
        message.seq = self._seq
        self.published += 1
        for listener in self._taps:
            listener(message)
        if computation_id is None:
            computation_id = computation_of(message)
        item = Published(message, computation_id, message.ByteSize())
        self._retain_item(item)
        lost = 0
        for subscription in self._subscribers:
            if subscription.wants(item.computation_id) and not subscription.offer(
                item, past_bounds
            ):
                lost += 1
        if lost:
            self.dropped += lost
            if self._on_drop is not None:
                self._on_drop(lost)

    def _retain_item(self, item: Published) -> None:
        if not self._retain:
            # Nothing is kept: every message is lost to replay at once, and a replay of its
            # computation must say so (as one of every computation does).
            self._evictions.note(item)
            return
        self._history.append(item)
        self._history_bytes += item.size
        while len(self._history) > self._retain or self._history_bytes > self._retain_bytes:
            evicted = self._history.popleft()
            self._history_bytes -= evicted.size
            self._evictions.note(evicted)

    # -- pacing -----------------------------------------------------------------------------

    def pace(self, computation_id: str) -> Awaitable[None] | None:
        """`wait_for_room` for an agent that has just published, or None when it need not
        wait: a set lookup per message, where `wait_for_room` would look at every subscriber."""
        backlogged = computation_id in self._backlogged and computation_id not in self._ending
        if not backlogged or not self._held_back(computation_id):
            return None
        return self.wait_for_room(computation_id)

    def unpace(self, computation_id: str) -> None:
        """Its VM ends: its agent's messages go out before the final event (none after it)."""
        self._ending.add(computation_id)
        self._wake(computation_id)

    def pace_again(self, computation_id: str) -> None:
        self._ending.discard(computation_id)

    def _held_back(self, computation_id: str) -> bool:
        if any(s.holds_back(computation_id, HOLD_ABOVE) for s in self._subscribers):
            return True
        self._backlogged.discard(computation_id)
        return False

    async def wait_for_room(self, computation_id: str) -> None:
        """For producers that can wait (agent connections): returns at once unless a
        subscriber has a backlog of this computation's messages over half its queue; then
        once the backlog is down to a quarter (woken by the subscriber that drained it), or
        after `hold_timeout`, when the subscribers still holding it back stop pacing (and
        will lose messages) until they have emptied their queues."""
        holders = [s for s in self._subscribers if s.holds_back(computation_id, HOLD_ABOVE)]
        if not holders:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._hold_timeout
        while True:
            holders = [
                s
                for s in holders
                if s in self._subscribers and s.holds_back(computation_id, RELEASE_AT)
            ]
            if not holders or computation_id in self._ending:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._give_up_on(holders, computation_id)
                return
            room = self._room.get(computation_id)
            if room is None or room.done():
                room = self._room[computation_id] = loop.create_future()
            try:
                async with asyncio.timeout(remaining):
                    await asyncio.shield(room)
            except TimeoutError:
                continue
            self.hold_wakeups += 1

    def _wake(self, computation_id: str) -> None:
        room = self._room.pop(computation_id, None)
        if room is not None and not room.done():
            room.set_result(None)

    def _give_up_on(self, holders: list[Subscription], computation_id: str) -> None:
        self.hold_timeouts += 1
        for subscription in holders:
            subscription.paces = False
            _log.warning(
                "events subscriber held an agent back too long; it no longer paces agents "
                "and will lose messages until it catches up",
                subscriber_filter=subscription.computation_id or "*",
                computation_id=computation_id,
                backlog=subscription.qsize(),
            )

    def close(self, last: pb.ClientStreamMessage | None = None) -> None:
        """Ends every stream after what it has queued. `last` (the shutdown's final notice) is
        published first, and reaches every stream that wants it even past its bounds."""
        if last is not None:
            self.publish(last, past_bounds=True)
            self._last = last
        self._closed = True
        for subscription in list(self._subscribers):
            subscription.close()
        for computation_id in list(self._room):
            self._wake(computation_id)
