"""Each VM's console history (QEMU's output and the agent's logs) for the Logs RPC.

A `ConsoleLog` is a ring bounded in lines and in bytes: the newest lines are kept, the oldest
dropped, so a chatty guest costs a fixed amount of memory. Readers either take the tail or
follow it; a follower has a queue of its own, bounded in lines and in bytes (as many bytes as
the console keeps), so a slow reader loses lines (and is told how many, where they went
missing) and never holds up QEMU's pipes or the agent, nor costs more than its console. The
number of readers at once is capped too (`MANAGER_LOG_MAX_STREAMS`): each holds gRPC buffers
besides its queue.

A `ConsoleArchive` holds the live log of every VM and, after a VM ended, keeps its log readable
for a while (a post-mortem: why did it die?), bounded in time and in the number of ended VMs.
All of it is used from the event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.config import ServiceSettings
from cocos_manager.errors import ResourceExhaustedError
from cocos_manager.proto import manager_pb2 as pb

FOLLOW_QUEUE_LINES = 1000
"""Lines a follower may have waiting before it loses the newer ones (bytes: the console's
own bound, `MANAGER_LOG_HISTORY_BYTES`)."""
LINE_OVERHEAD = 64
"""Bytes charged per line on top of its text, so a flood of empty lines is bounded too."""
LOST_LEVEL = "warn"


@dataclass(frozen=True, slots=True)
class ConsoleLine:
    timestamp_ns: int  # since the epoch
    level: str
    text: str

    @property
    def size(self) -> int:
        return len(self.text.encode()) + len(self.level) + LINE_OVERHEAD

    def to_pb(self, computation_id: str) -> pb.AgentLog:
        stamp = Timestamp()
        stamp.FromNanoseconds(self.timestamp_ns)
        return pb.AgentLog(
            message=self.text, computation_id=computation_id, level=self.level, timestamp=stamp
        )


def lost_line(count: int) -> ConsoleLine:
    """What a follower that fell behind reads where lines went missing."""
    return ConsoleLine(
        time.time_ns(), LOST_LEVEL, f"cocos-manager: {count} console lines lost (reader too slow)"
    )


def notice_line(text: str) -> ConsoleLine:
    """The manager's own word to followers (not kept in the log): why their stream ends."""
    return ConsoleLine(time.time_ns(), LOST_LEVEL, f"cocos-manager: {text}")


class _Follower:
    """One follower's queue: lines, or a count of lines lost at that point; None ends it.
    Bounded in lines and in bytes; the first line always fits (the console cut it to its
    byte bound), so a follower of a guest printing long lines still gets some."""

    __slots__ = ("bytes", "items", "lost", "max_bytes", "wake")

    def __init__(self, max_bytes: int) -> None:
        self.items: deque[ConsoleLine | int | None] = deque()
        self.bytes = 0
        self.max_bytes = max_bytes
        self.lost = 0
        self.wake = asyncio.Event()

    def offer(self, line: ConsoleLine) -> None:
        size = line.size
        if self.items and (
            len(self.items) >= FOLLOW_QUEUE_LINES or self.bytes + size > self.max_bytes
        ):
            self.lost += 1
            return
        if self.lost:
            self.items.append(self.lost)
            self.lost = 0
        self.items.append(line)
        self.bytes += size
        self.wake.set()

    def take(self) -> ConsoleLine | int | None:
        """The next item; with nothing queued, the lines lost since the last one (a loss at
        the end is told once the reader has caught up, not only with the next line)."""
        if not self.items:
            lost, self.lost = self.lost, 0
            return lost
        item = self.items.popleft()
        if isinstance(item, ConsoleLine):
            self.bytes -= item.size
        return item

    def end(self, last: ConsoleLine | None = None) -> None:
        if self.lost:
            self.items.append(self.lost)
            self.lost = 0
        if last is not None:
            self.items.append(last)
        self.items.append(None)
        self.wake.set()


class ConsoleLog:
    """One VM's console; `append` never blocks and never raises."""

    def __init__(self, computation_id: str, max_lines: int, max_bytes: int) -> None:
        self.computation_id = computation_id
        self.max_lines = max(1, max_lines)
        self.max_bytes = max(1, max_bytes)
        self._lines: deque[ConsoleLine] = deque()
        self._sizes: deque[int] = deque()  # each line's size, worked out once (it encodes)
        self._bytes = 0
        self._followers: set[_Follower] = set()
        self.dropped = 0  # lines pushed out of the ring by newer ones
        self.ended_at: float | None = None  # monotonic time of close()
        self._unfollowed: ConsoleLine | None = None  # set by end_followers: its last word

    @property
    def closed(self) -> bool:
        return self.ended_at is not None

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lines)

    def append(self, level: str, text: str, timestamp_ns: int | None = None) -> None:
        """A line of QEMU's output or an agent log. Lines after close() (QEMU's last words
        drained from its pipes) are kept for the post-mortem but reach no follower."""
        line = ConsoleLine(time.time_ns() if timestamp_ns is None else timestamp_ns, level, text)
        size = line.size
        if size > self.max_bytes:  # one line alone over the budget: keep its beginning
            room = max(0, self.max_bytes - len(level) - LINE_OVERHEAD)
            line = ConsoleLine(
                line.timestamp_ns, level, text.encode()[:room].decode("utf-8", "ignore")
            )
            size = line.size
        lines, sizes = self._lines, self._sizes
        lines.append(line)
        sizes.append(size)
        self._bytes += size
        while len(lines) > self.max_lines or (self._bytes > self.max_bytes and len(lines) > 1):
            lines.popleft()
            self._bytes -= sizes.popleft()
            self.dropped += 1
        for follower in self._followers:
            follower.offer(line)

    def tail(self, count: int = 0) -> list[ConsoleLine]:
        """The last `count` lines kept; 0 = all of them."""
        if count <= 0 or count >= len(self._lines):
            return list(self._lines)
        return list(self._lines)[-count:]

    async def follow(self, count: int = 0) -> AsyncIterator[ConsoleLine]:
        """tail(count), then every new line until the log is closed or the caller stops.

        The tail is taken and the follower registered in one synchronous step, so no line is
        missed or repeated between the two."""
        backlog = self.tail(count)
        follower = _Follower(self.max_bytes)
        if self.closed or self._unfollowed is not None:
            follower.end(self._unfollowed)
        else:
            self._followers.add(follower)
        try:
            for line in backlog:
                yield line
            while True:
                while not follower.items and not follower.lost:
                    follower.wake.clear()
                    await follower.wake.wait()
                item = follower.take()
                if item is None:
                    return
                yield lost_line(item) if isinstance(item, int) else item
        finally:
            self._followers.discard(follower)

    @property
    def follower_count(self) -> int:
        return len(self._followers)

    def end_followers(self, last: ConsoleLine) -> None:
        """The log lives on but nobody may follow it any more (the manager shuts down and
        leaves the VM running): followers get what is queued and `last`, then their stream
        ends; later ones get the tail and `last`."""
        self._unfollowed = last
        for follower in self._followers:
            follower.end(last)
        self._followers.clear()

    def close(self, now: float | None = None) -> None:
        """The VM ended: followers get what is queued, then their stream ends."""
        if self.ended_at is not None:
            return
        self.ended_at = time.monotonic() if now is None else now
        for follower in self._followers:
            follower.end()
        self._followers.clear()


class ConsoleArchive:
    """The live console of each computation, and the consoles of ended VMs for a while.

    A computation id that runs again gets a fresh log: Logs shows the live run, and the ended
    run's log is dropped then (only one log per id is ever reachable).
    """

    def __init__(
        self,
        max_lines: int = 1000,
        max_bytes: int = 256 * 1024,
        retention: float = 3600.0,
        retained_vms: int = 50,
        clock: Callable[[], float] = time.monotonic,
        max_streams: int = 64,
    ) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.retention = retention
        self.retained_vms = retained_vms
        self.max_streams = max_streams  # Logs readers at once; 0 = no limit
        self.streams = 0
        self._clock = clock
        self._live: dict[str, ConsoleLog] = {}
        self._ended: dict[str, ConsoleLog] = {}  # oldest ended first

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ConsoleArchive:
        return cls(
            max_lines=settings.LOG_HISTORY_LINES,
            max_bytes=settings.LOG_HISTORY_BYTES,
            retention=settings.LOG_RETENTION,
            retained_vms=settings.LOG_RETAINED_VMS,
            max_streams=settings.LOG_MAX_STREAMS,
        )

    def open_stream(self) -> None:
        """Counts a Logs reader in, or refuses it beyond MANAGER_LOG_MAX_STREAMS: each costs
        up to a console's bytes in its queue plus gRPC's buffers, for as long as it stays.
        Every successful call is paired with `close_stream`."""
        if self.max_streams and self.streams >= self.max_streams:
            raise ResourceExhaustedError(
                f"Logs: {self.streams} streams already (MANAGER_LOG_MAX_STREAMS={self.max_streams})"
            )
        self.streams += 1

    def close_stream(self) -> None:
        self.streams -= 1

    def open(self, computation_id: str) -> ConsoleLog:
        """A fresh live log for a VM being started (or adopted); replaces any earlier one."""
        self._ended.pop(computation_id, None)
        previous = self._live.pop(computation_id, None)
        if previous is not None:
            previous.close(self._clock())
        log = ConsoleLog(computation_id, self.max_lines, self.max_bytes)
        self._live[computation_id] = log
        return log

    def live(self, computation_id: str) -> ConsoleLog | None:
        return self._live.get(computation_id)

    def live_logs(self) -> list[ConsoleLog]:
        return list(self._live.values())

    def end_followers(self, last: ConsoleLine) -> None:
        """Every live log's followers end with `last` (ConsoleLog.end_followers)."""
        for log in self._live.values():
            log.end_followers(last)

    def close(self, log: ConsoleLog) -> None:
        """The VM of `log` ended: its followers finish and it is kept for the post-mortem.
        A log that is no longer the live one of its id (replaced by a new run) is dropped."""
        log.close(self._clock())
        if self._live.get(log.computation_id) is log:
            del self._live[log.computation_id]
            if self.retained_vms > 0 and self.retention > 0:
                self._ended.pop(log.computation_id, None)
                self._ended[log.computation_id] = log
        self.prune()

    def discard(self, log: ConsoleLog) -> None:
        """The log of a VM that never was (its admission failed): dropped, not retained."""
        log.close(self._clock())
        if self._live.get(log.computation_id) is log:
            del self._live[log.computation_id]

    def get(self, computation_id: str) -> ConsoleLog | None:
        """The live log of the id, else its ended one while retained; None if neither."""
        self.prune()
        live = self._live.get(computation_id)  # not `or`: an empty log is falsy (len 0)
        return live if live is not None else self._ended.get(computation_id)

    def prune(self) -> None:
        """Drops ended logs past the retention and beyond the count, oldest first. Lazy (on
        close and get): memory stays bounded by the count even if nobody asks for a while."""
        now = self._clock()
        for computation_id, log in list(self._ended.items()):
            expired = log.ended_at is not None and now - log.ended_at >= self.retention
            if expired or len(self._ended) > self.retained_vms:
                del self._ended[computation_id]
            else:
                break  # ordered by end time: the rest are newer

    @property
    def retained(self) -> list[str]:
        """Ids whose ended console is kept, oldest first."""
        self.prune()
        return list(self._ended)
