"""What the dial-out makes of the bytes a computations server sends, and how it says so.

The stream is read as raw bytes and decoded here, not by gRPC's deserializer: grpc.aio hands a
message its deserializer cannot parse over as None (after logging a traceback of its own), and
nothing downstream can tell which message that was or how big. Decoding here, an undecodable
message is one counted, logged and answered-if-possible event, never an exception in the
reader. A message cut short after its `id` still names the computation, and the server that
sent it is waiting for an answer to that id: it gets its `vm-provision`/`failed` like any
other refused request.

A buggy or hostile server can send such messages as fast as the stream carries them, so what
the log says of them is rate-limited (`Complaints`); the metric counts every one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from cocos_manager.proto import manager_pb2 as pb

SALVAGE_SCAN = 64 * 1024
"""Bytes of an undecodable message searched for its id: serializers write field 1 first, and
a scan in Python over a message of millions of tiny fields would hold the event loop."""
LOG_BURST = 10
"""Lines of one kind said in full per LOG_WINDOW; the rest are counted into the next line."""
LOG_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A message that is no ComputationRunReq: its size, why, and the id it still named."""

    size: int
    error: str
    computation_id: str

    def describe(self) -> str:
        return f"undecodable ComputationRunReq ({self.size} bytes): {self.error}"


def decode_request(raw: bytes) -> pb.ComputationRunReq | Undecodable:
    try:
        return pb.ComputationRunReq.FromString(raw)
    except DecodeError as error:
        return Undecodable(len(raw), str(error) or "not a protobuf message", salvage_id(raw))
    except Exception as error:  # the C++ parser's other complaints (e.g. recursion depth)
        return Undecodable(len(raw), repr(error), salvage_id(raw))


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and the offset after it; IndexError/ValueError when malformed."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def salvage_id(raw: bytes) -> str:
    """The last complete `id` (field 1, a string) before the message broke; "" when none.

    Only what precedes the fault is trusted, and only a valid UTF-8 id: enough to answer the
    request, never to run it.
    """
    found = ""
    at = 0
    raw = raw[:SALVAGE_SCAN]
    try:
        while at < len(raw):
            key, at = _varint(raw, at)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, at = _varint(raw, at)
            elif wire == 1:
                at += 8
            elif wire == 5:
                at += 4
            elif wire == 2:
                length, at = _varint(raw, at)
                if at + length > len(raw):
                    break
                if field == 1:
                    found = raw[at : at + length].decode()
                at += length
            else:  # groups (3, 4) and invalid wire types: nothing after them is trusted
                break
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        pass
    return found


class Complaints:
    """Log lines about what a server sent wrong, at most LOG_BURST per kind per LOG_WINDOW.

    Each message is said at most once; what a flood makes it leave out is counted and said in
    one line when its window ends (or by `flush`, when the dial-out closes).
    """

    def __init__(self, log: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._window: dict[str, tuple[float, int]] = {}  # kind: (window start, lines said)
        self._unsaid: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def say(self, kind: str, **fields: Any) -> None:
        now = self._clock()
        start, said = self._window.get(kind, (now, 0))
        if now - start >= LOG_WINDOW:  # a new window: what the last one left out is said first
            start, said = now, 0
            timer = self._timers.pop(kind, None)
            if timer is not None:
                timer.cancel()
            self._say_unsaid(kind)
        if said < LOG_BURST:
            self._window[kind] = (start, said + 1)
            self._log.warning(kind, **fields)
            return
        self._window[kind] = (start, said)
        self._unsaid[kind] = self._unsaid.get(kind, 0) + 1
        if kind not in self._timers:
            wait = max(0.0, start + LOG_WINDOW - now)
            self._timers[kind] = asyncio.get_running_loop().call_later(wait, self._say_unsaid, kind)

    def _say_unsaid(self, kind: str) -> None:
        self._timers.pop(kind, None)
        unsaid = self._unsaid.pop(kind, 0)
        if unsaid:
            self._log.warning(f"{kind} (more, not logged one by one)", count=unsaid)

    def flush(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for kind in list(self._unsaid):
            self._say_unsaid(kind)
        self._timers.clear()
