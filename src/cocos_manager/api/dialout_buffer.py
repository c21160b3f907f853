"""The dial-out's outgoing buffer: one bound for everything a computations server can make the
daemon hold for it.

It holds at most `size` places: each message waiting to be sent takes one, and so does each
request read and not answered yet (the place its answer will take); and at most `size_bytes`
of events and logs (an agent's message may be up to 1 MiB: 10,000 places of those would be
10 GiB). So an answer is never dropped, events and logs are dropped (counted, logged once per
burst) when there is no place or no room in bytes, and the reader asks `wait_for_room` before
it reads the next request: a server that sends requests and reads nothing fills the buffer
once, and is then held back by HTTP/2 flow control rather than by the daemon's memory.
Requests in flight are bounded too, in number (`in_flight`: the tasks a flood can make) and in
bytes (`in_flight_bytes`, plus the one message read last: what large requests held by slow
Runs can pin).
"""

from __future__ import annotations

import asyncio
from collections import deque

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry import Metrics, get_logger

_log = get_logger()


class OutgoingBuffer:
    """Appends never wait (Run and the event bus call them); the writer and reader wait."""

    def __init__(
        self, size: int, size_bytes: int, in_flight: int, in_flight_bytes: int, metrics: Metrics
    ) -> None:
        self.size = size
        self.size_bytes = size_bytes
        self.bytes = 0  # of the messages held
        self.in_flight = in_flight
        self.in_flight_bytes = in_flight_bytes
        self.open_bytes = 0
        self._metrics = metrics
        self._messages: deque[tuple[pb.ClientStreamMessage, int]] = deque()
        self.open_requests = 0  # read, not answered yet: each holds a place for its answer
        self._queued = asyncio.Event()
        self._room = asyncio.Event()  # set when a place or a request slot is freed
        self.finishing = False
        self.dropped = 0  # in the current overflow burst
        self.dropped_total = 0
        metrics.dialout_buffered.set(0)

    def __len__(self) -> int:
        return len(self._messages)

    def held(self) -> int:
        return len(self._messages) + self.open_requests

    # -- what goes in --------------------------------------------------------------------------

    def offer(self, message: pb.ClientStreamMessage, connected: bool) -> bool:
        """An event or log: appended if there is a place and room in bytes, else dropped and
        counted."""
        size = message.ByteSize()
        if self.held() >= self.size or self.bytes + size > self.size_bytes:
            if self.dropped == 0:
                _log.warning(
                    "dial-out buffer full: dropping events and logs",
                    buffer_size=self.size,
                    buffer_bytes=self.size_bytes,
                    connected=connected,
                )
            self.dropped += 1
            self.dropped_total += 1
            self._metrics.dialout_dropped.inc()
            return False
        self.push(message, size)
        return True

    def push(self, message: pb.ClientStreamMessage, size: int = -1) -> None:
        """An answer (its place was held since its request was read), or any message that
        must not be dropped."""
        size = message.ByteSize() if size < 0 else size
        self._messages.append((message, size))
        self.bytes += size
        self._metrics.dialout_buffered.set(len(self._messages))
        self._queued.set()

    def request_read(self, size: int) -> None:
        self.open_requests += 1
        self.open_bytes += size

    def request_done(self, size: int) -> None:
        """After its answer was pushed (or it was cancelled): its place is the answer's now."""
        self.open_requests -= 1
        self.open_bytes -= size
        self._room.set()

    # -- what comes out ------------------------------------------------------------------------

    def has_room(self) -> bool:
        """For one more request: a place for its answer, and room under the in-flight bounds."""
        return (
            self.held() < self.size
            and self.open_requests < self.in_flight
            and self.open_bytes < self.in_flight_bytes
        )

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    async def next(self) -> pb.ClientStreamMessage | None:
        """The oldest message, left in place until `sent` (a failed write sends it again);
        None once `finish` was called and nothing is left."""
        while not self._messages:
            if self.finishing:
                return None
            self._queued.clear()
            await self._queued.wait()
        return self._messages[0][0]

    def finish(self) -> None:
        """At shutdown: the writer, once it has sent the last message, is told so by `next`
        rather than waiting for more, and ends the stream (dialout.py)."""
        self.finishing = True
        self._queued.set()

    def sent(self, message: pb.ClientStreamMessage) -> None:
        if self._messages and self._messages[0][0] is message:
            self.bytes -= self._messages.popleft()[1]
        self._metrics.dialout_buffered.set(len(self._messages))
        self._room.set()
        if self.dropped and self.held() < self.size // 2 and self.bytes < self.size_bytes // 2:
            _log.warning("dial-out buffer has room again", dropped=self.dropped)
            self.dropped = 0
