"""Property tests of the agent stream reader: whatever an agent sends, the manager either gets
valid messages or a clean AgentProtocolError, never a crash and never a hang.

The properties are plain functions with their strategies in PROPERTIES, so scripts/fuzz.py
runs the very same checks with hundreds of thousands of examples.
"""

from __future__ import annotations

import asyncio
import atexit
import struct
from collections.abc import Callable, Coroutine
from itertools import pairwise
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from cocos_manager.agent.protocol import (
    LEGACY_TAGS,
    MAX_FRAME,
    AgentProtocolError,
    read_agent_messages,
)
from cocos_manager.proto.manager_pb2 import AgentEvent, AgentLog, ClientStreamMessage
from tests.support.streams import AckSink

HANG_GUARD = 5.0
TEST_SETTINGS = settings(max_examples=150, deadline=None)


T = TypeVar("T")


_loop: asyncio.AbstractEventLoop | None = None


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs on one private loop (a new loop per example would dominate a 100k-example run);
    a hang becomes a TimeoutError, which no property accepts."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        atexit.register(_loop.close)
    return _loop.run_until_complete(asyncio.wait_for(coroutine, HANG_GUARD))


async def read_all(
    chunks: list[bytes],
) -> tuple[list[ClientStreamMessage], bytes, AgentProtocolError | None]:
    """Feeds chunks one loop turn apart (so reads see the stream in pieces), then EOF."""
    reader = asyncio.StreamReader()
    sink = AckSink()

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    messages: list[ClientStreamMessage] = []
    error: AgentProtocolError | None = None
    try:
        async for message in read_agent_messages(reader, sink):
            messages.append(message)
    except AgentProtocolError as raised:
        error = raised
    feeder.cancel()
    return messages, bytes(sink.data), error


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points) if b > a]


# -- a second, straightforward reading of the contract, to compare against --------------------


def _parse_or_none(payload: bytes) -> ClientStreamMessage | None:
    message = ClientStreamMessage()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        return None
    return message if message.WhichOneof("message") in {"agent_log", "agent_event"} else None


def reference(data: bytes) -> tuple[list[ClientStreamMessage], list[int], bool]:
    """(messages, acked ids, ended in error) as docs/contracts.md describes the stream."""
    messages: list[ClientStreamMessage] = []
    acks: list[int] = []
    if not data:
        return messages, acks, False
    legacy = data[0] in LEGACY_TAGS
    pos = 0
    while pos < len(data):
        if legacy:
            if data[pos] not in LEGACY_TAGS:
                return messages, acks, True
            length, end = 0, pos + 1
            for shift in range(0, 70, 7):
                if end >= len(data):
                    return messages, acks, True
                length |= (data[end] & 0x7F) << shift
                end += 1
                if not data[end - 1] & 0x80:
                    break
            else:
                return messages, acks, True
            if end - pos + length > MAX_FRAME or end + length > len(data):
                return messages, acks, True
            payload, pos = data[pos : end + length], end + length
        else:
            if pos + 8 > len(data):
                return messages, acks, True
            message_id, length = struct.unpack_from("<II", data, pos)
            if length > MAX_FRAME or pos + 8 + length > len(data):
                return messages, acks, True
            payload, pos = data[pos + 8 : pos + 8 + length], pos + 8 + length
        message = _parse_or_none(payload)
        if message is None:
            return messages, acks, True
        messages.append(message)
        if not legacy:
            acks.append(message_id)
    return messages, acks, False


# -- strategies -------------------------------------------------------------------------------

timestamps = st.builds(
    Timestamp,
    seconds=st.integers(-62_135_596_800, 253_402_300_799),
    nanos=st.integers(0, 999_999_999),
)
agent_logs = st.builds(
    lambda message, cid, level, ts: ClientStreamMessage(
        agent_log=AgentLog(message=message, computation_id=cid, level=level, timestamp=ts)
    ),
    st.text(),
    st.text(max_size=40),
    st.text(max_size=10),
    st.none() | timestamps,
)
agent_events = st.builds(
    lambda event_type, ts, cid, details, originator, status: ClientStreamMessage(
        agent_event=AgentEvent(
            event_type=event_type,
            timestamp=ts,
            computation_id=cid,
            details=details,
            originator=originator,
            status=status,
        )
    ),
    st.text(max_size=30),
    st.none() | timestamps,
    st.text(max_size=40),
    st.binary(),
    st.text(max_size=20),
    st.text(max_size=20),
)
valid_messages = agent_logs | agent_events
message_ids = st.integers(0, 2**32 - 1)
first_ids = message_ids.filter(lambda i: i & 0xFF not in LEGACY_TAGS)


def frame(message_id: int, payload: bytes) -> bytes:
    return struct.pack("<II", message_id, len(payload)) + payload


def _framed_stream(parts: list[tuple[int, bytes]]) -> bytes:
    return b"".join(frame(i, p) for i, p in parts)


payloads = st.one_of(
    st.binary(max_size=64),
    valid_messages.map(lambda m: m.SerializeToString()),
)
# Streams near the contract reach deeper than uniform noise: valid frames with bad ones mixed
# in, lengths around the limit, truncations, and bare bytes.
hostile_streams = st.one_of(
    st.binary(max_size=512),
    st.lists(st.tuples(message_ids, payloads), max_size=6).map(_framed_stream),
    st.tuples(
        st.lists(st.tuples(message_ids, payloads), max_size=4).map(_framed_stream),
        st.integers(0, 2**32 - 1) | st.sampled_from([MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1]),
        st.binary(max_size=32),
    ).map(lambda t: t[0] + struct.pack("<II", 1, t[1]) + t[2]),
    st.lists(payloads, max_size=6).map(b"".join),
    st.tuples(st.lists(payloads, min_size=1, max_size=4).map(b"".join), st.integers(0, 200)).map(
        lambda t: t[0][: t[1]]
    ),
)


# -- properties -------------------------------------------------------------------------------


def check_hostile_stream(data: bytes, cuts: list[int]) -> None:
    messages, acks, error = run(read_all(split(data, cuts)))
    expected, expected_acks, expected_error = reference(data)
    assert (error is not None) == expected_error, error
    assert messages == expected
    assert acks == b"".join(struct.pack("<I", i) for i in expected_acks)
    for message in messages:
        assert message.WhichOneof("message") in {"agent_log", "agent_event"}


def check_framed_round_trip(
    first_id: int, ids: list[int], messages: list[ClientStreamMessage], cuts: list[int]
) -> None:
    all_ids = [first_id, *ids][: len(messages)]
    messages = messages[: len(all_ids)]
    data = b"".join(frame(i, m.SerializeToString()) for i, m in zip(all_ids, messages, strict=True))
    got, acks, error = run(read_all(split(data, cuts)))
    assert error is None
    assert got == messages
    assert acks == b"".join(struct.pack("<I", i) for i in all_ids)


def check_legacy_round_trip(messages: list[ClientStreamMessage], cuts: list[int]) -> None:
    data = b"".join(m.SerializeToString() for m in messages)
    got, acks, error = run(read_all(split(data, cuts)))
    assert error is None
    assert got == messages
    assert acks == b""


def check_legacy_single_write(message: ClientStreamMessage) -> None:
    got, acks, error = run(read_all([message.SerializeToString()]))
    assert (error, got, acks) == (None, [message], b"")


cut_lists = st.lists(st.integers(0, 10_000), max_size=8)

PROPERTIES: dict[str, tuple[Callable[..., None], tuple[SearchStrategy[Any], ...]]] = {
    "hostile-stream": (check_hostile_stream, (hostile_streams, cut_lists)),
    "framed-round-trip": (
        check_framed_round_trip,
        (
            first_ids,
            st.lists(message_ids, max_size=8),
            st.lists(valid_messages, max_size=9),
            cut_lists,
        ),
    ),
    "legacy-round-trip": (
        check_legacy_round_trip,
        (st.lists(valid_messages, min_size=1, max_size=6), cut_lists),
    ),
    "legacy-single-write": (check_legacy_single_write, (valid_messages,)),
}


def property_test(name: str, config: settings) -> Callable[[], None]:
    """The named property as a runnable hypothesis test under ``config``."""
    check, strategies = PROPERTIES[name]
    test: Callable[[], None] = config(given(*strategies)(check))
    return test


test_hostile_stream = property_test("hostile-stream", TEST_SETTINGS)
test_framed_round_trip = property_test("framed-round-trip", TEST_SETTINGS)
test_legacy_round_trip = property_test("legacy-round-trip", TEST_SETTINGS)
test_legacy_single_write = property_test("legacy-single-write", TEST_SETTINGS)


@given(st.binary(max_size=64), st.sampled_from(sorted(LEGACY_TAGS)))
@TEST_SETTINGS
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes, tag: int) -> None:
    """Uniform noise, both with a framed and with a legacy first byte."""
    for stream in (data, bytes([tag]) + data):
        messages, _, _ = run(read_all([stream]))
        assert all(m.WhichOneof("message") in {"agent_log", "agent_event"} for m in messages)
