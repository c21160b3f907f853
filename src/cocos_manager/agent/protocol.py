"""The stream of events and logs an agent sends to the manager.

The wire format is docs/contracts.md, "Agent channel".

Kept apart from the transport so the same code reads vsock in production and socketpairs or
TCP in tests. Two framings exist and both are read here:

* framed (current agents): ``[u32 LE message id][u32 LE length][payload]``; the manager acks
  each accepted message by writing its 4-byte id back, so the agent knows what to resend after a
  reconnect.
* legacy (agents of the original README's era): bare ``ClientStreamMessage`` bytes, one message
  per write. The original read 1024 bytes at a time and parsed each read as one message,
  which drops or corrupts messages as soon as two writes coalesce or one write
  is split by the stream. A legacy agent marshals a ``ClientStreamMessage`` whose only content is
  its oneof, i.e. exactly one length-delimited field (tag 0x0a, 0x12 or 0x1a, varint length,
  body). That makes the stream self-delimiting, so it is split at field boundaries instead of
  read boundaries: the same bytes give the same messages however the transport chunks them.

The first byte tells the framings apart: a bare message starts with one of those three tags,
a framed one with the low byte of a (small) message id. An agent whose first message id has
0x0a, 0x12 or 0x1a as its low byte would be misread as legacy; current agents start at small ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from google.protobuf.message import DecodeError

from cocos_manager.events import MANAGER_ORIGINATOR
from cocos_manager.proto.manager_pb2 import AgentEvent, AgentLog, ClientStreamMessage
from cocos_manager.telemetry import get_logger

MAX_FRAME = 1 << 20
"""Largest payload accepted; bounds what one agent can make the manager allocate."""

_AGENT_LOG_TAG, _AGENT_EVENT_TAG, _RUN_RES_TAG = 0x0A, 0x12, 0x1A
LEGACY_TAGS = frozenset({_AGENT_LOG_TAG, _AGENT_EVENT_TAG, _RUN_RES_TAG})
"""Field tags of ClientStreamMessage's oneof (agent_log, agent_event, run_res), wire type 2."""

_HEADER = struct.Struct("<II")
_ACK = struct.Struct("<I")
_MAX_VARINT_BYTES = 10
_ACCEPTED = frozenset({"agent_log", "agent_event"})
_CLOSE_TIMEOUT = 1.0


class AgentProtocolError(Exception):
    """The agent broke the wire contract; the connection is dropped, the manager carries on."""


class AckWriter(Protocol):
    """The part of asyncio.StreamWriter the reader needs: a place to send acks to."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


async def _read_exactly(reader: asyncio.StreamReader, size: int, what: str) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:
        raise AgentProtocolError(
            f"stream ended inside {what} ({len(error.partial)} of {size} bytes)"
        ) from None


def _parse(payload: bytes) -> ClientStreamMessage:
    message = ClientStreamMessage()
    try:
        message.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise AgentProtocolError(f"payload is not a ClientStreamMessage: {error}") from None
    kind = message.WhichOneof("message")
    if kind not in _ACCEPTED:
        raise AgentProtocolError(_refusal(kind or "nothing"))
    return message


def _refusal(kind: str) -> str:
    return f"message carries {kind}; an agent may send only agent_log or agent_event"


_READ_SIZE = 64 * 1024
"""Bytes asked of the socket at a time."""
YIELD_EVERY = 256
"""Frames parsed, acked and handed on at most per batch; between two batches of one read the
loop gets a turn. Reads return at once while data is buffered, so a guest flooding small
frames (6,500 in a read) was read, parsed and published for as long as it kept its socket
full: 0.3 s steps, during which no RPC, QMP event, timer or other guest was served. The loop
gets a turn after every batch, never inside one: a connection cancelled there (its VM
released) has published every frame it acked, and acked none it has not parsed."""


class _Acks:
    """Acks of accepted frames, written together: one write per read instead of a system call
    per frame. Written two turns of the event loop later, so that what the read's messages
    woke (an Events stream handing them to gRPC) goes first; flushed at the end."""

    def __init__(self, writer: AckWriter) -> None:
        self._writer = writer
        self._pending = bytearray()
        self._scheduled = False

    def add(self, message_id: int) -> None:
        self._pending += _ACK.pack(message_id)

    def schedule(self) -> None:
        if self._pending and not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            self._writer.write(pending)


def _split_frames(
    buffer: bytearray, acks: _Acks, offset: int = 0
) -> tuple[list[ClientStreamMessage], int, AgentProtocolError | None]:
    """The complete frames in `buffer` from `offset` (at most YIELD_EVERY), acked as they
    parse; where they end; the contract breach that stopped the parse, if one did (the frames
    before it stand)."""
    messages: list[ClientStreamMessage] = []
    end, limit = len(buffer), YIELD_EVERY
    unpack, header_size = _HEADER.unpack_from, _HEADER.size
    try:
        while end - offset >= header_size and len(messages) < limit:
            message_id, length = unpack(buffer, offset)
            if length > MAX_FRAME:
                raise AgentProtocolError(
                    f"frame {message_id} claims {length} bytes (max {MAX_FRAME})"
                )
            start = offset + header_size
            if end - start < length:
                break
            messages.append(_parse(bytes(buffer[start : start + length])))
            acks.add(message_id)
            offset = start + length
    except AgentProtocolError as error:
        return messages, offset, error
    return messages, offset, None


def _cut_short(buffer: bytearray) -> AgentProtocolError:
    if len(buffer) < _HEADER.size:
        return AgentProtocolError(
            f"stream ended inside a frame header ({len(buffer)} of {_HEADER.size} bytes)"
        )
    message_id, length = _HEADER.unpack_from(buffer)
    got = len(buffer) - _HEADER.size
    return AgentProtocolError(f"stream ended inside frame {message_id} ({got} of {length} bytes)")


async def _read_framed(
    reader: asyncio.StreamReader, writer: AckWriter, first: bytes
) -> AsyncGenerator[list[ClientStreamMessage], None]:
    """Each read's complete frames, in batches of at most YIELD_EVERY, the loop's turn after
    each. Holds at most one incomplete frame (MAX_FRAME) and one read."""
    acks = _Acks(writer)
    buffer = bytearray(first)
    used = 0  # bytes of `buffer` already handed on
    full = False  # the last batch stopped at YIELD_EVERY: more frames may be buffered
    handed = False  # a batch was handed on: the loop's turn before the next one
    try:
        while True:
            await writer.drain()  # an agent that reads no acks stops being read
            if handed:
                await asyncio.sleep(0)  # a read returns at once while data is buffered
            if not full:
                if used:  # what was handed on, dropped once per read, not once per batch
                    del buffer[:used]
                    used = 0
                chunk = await reader.read(_READ_SIZE)
                if not chunk:
                    if buffer:
                        raise _cut_short(buffer)
                    return  # EOF at a frame boundary
                buffer += chunk
            messages, used, error = _split_frames(buffer, acks, used)
            full = len(messages) == YIELD_EVERY
            handed = bool(messages)
            if messages:
                acks.schedule()
                yield messages
            if error is not None:
                raise error
    finally:
        acks.flush()


async def _read_varint(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    raw = bytearray()
    value = 0
    while len(raw) < _MAX_VARINT_BYTES:
        byte = (await _read_exactly(reader, 1, "a message length"))[0]
        value |= (byte & 0x7F) << (7 * len(raw))
        raw.append(byte)
        if not byte & 0x80:
            return value, bytes(raw)
    raise AgentProtocolError("message length is not a valid varint")


async def _read_legacy(
    reader: asyncio.StreamReader, first: bytes
) -> AsyncGenerator[list[ClientStreamMessage], None]:
    """One message at a time (nothing to ack), the loop's turn after every YIELD_EVERY: reads
    return at once while data is buffered, as on the framed path."""
    handed = 0
    while True:
        if not first:
            first = await reader.read(1)
            if not first:
                return
        tag = first[0]
        if tag not in LEGACY_TAGS:
            raise AgentProtocolError(f"unframed stream has field tag {tag:#04x} at a message start")
        if tag == _RUN_RES_TAG:
            raise AgentProtocolError(_refusal("run_res"))
        length, raw_length = await _read_varint(reader)
        size = len(first) + len(raw_length) + length
        if size > MAX_FRAME:
            raise AgentProtocolError(f"unframed message claims {size} bytes (max {MAX_FRAME})")
        body = await _read_exactly(reader, length, "an unframed message")
        # Parsing the body as the field's own type is the same as parsing the whole record as a
        # ClientStreamMessage, without copying up to MAX_FRAME bytes to rebuild the record.
        yield [_parse_legacy(tag, body)]
        first = b""
        handed += 1
        if handed % YIELD_EVERY == 0:
            await asyncio.sleep(0)


def _parse_legacy(tag: int, body: bytes) -> ClientStreamMessage:
    try:
        if tag == _AGENT_LOG_TAG:
            return ClientStreamMessage(agent_log=AgentLog.FromString(body))
        return ClientStreamMessage(agent_event=AgentEvent.FromString(body))
    except (DecodeError, ValueError, RuntimeError) as error:
        raise AgentProtocolError(f"payload is not a ClientStreamMessage: {error}") from None


async def read_agent_batches(
    reader: asyncio.StreamReader, writer: AckWriter
) -> AsyncGenerator[list[ClientStreamMessage], None]:
    """Yields the agent's messages, as many at a time as one read brought, until EOF at a
    message boundary.

    Raises AgentProtocolError on a contract breach (after yielding the messages before it);
    transport failures (OSError) pass through. Framed messages are acked once they parse, the
    write made after the batch was taken: an ack means the manager accepted the message, not
    that a client has seen it.
    """
    first = await reader.read(1)
    if not first:
        return
    batches = (
        _read_legacy(reader, first)
        if first[0] in LEGACY_TAGS
        else _read_framed(reader, writer, first)
    )
    async with contextlib.aclosing(batches):
        async for batch in batches:
            yield batch


async def read_agent_messages(
    reader: asyncio.StreamReader, writer: AckWriter
) -> AsyncGenerator[ClientStreamMessage, None]:
    """`read_agent_batches`, one message at a time."""
    async with contextlib.aclosing(read_agent_batches(reader, writer)) as batches:
        async for batch in batches:
            for message in batch:
                yield message


AGENT_ORIGINATOR = "agent"


def stamp(message: ClientStreamMessage, computation_id: str) -> ClientStreamMessage:
    """Overwrites computation_id in place (and returns the message): the peer's CID, not the
    agent's own claim, says which computation a message belongs to."""
    kind = message.WhichOneof("message")
    if kind == "agent_log":
        message.agent_log.computation_id = computation_id
    elif kind == "agent_event":
        message.agent_event.computation_id = computation_id
    return message


def disown_manager(message: ClientStreamMessage) -> bool:
    """Rewrites an agent event that claims the Manager as its originator to "agent" (in place);
    True if it did.

    Clients trust originator "manager" (vm-provision, vm-exit...): a guest must not be able to
    forge those. The event itself is kept, not dropped: what the agent says may still matter
    to its owner, only the claim is false. Any spelling that a client might read as the
    Manager ("Manager", " manager ") counts.
    """
    if message.WhichOneof("message") != "agent_event":
        return False
    if message.agent_event.originator.strip().lower() != MANAGER_ORIGINATOR:
        return False
    message.agent_event.originator = AGENT_ORIGINATOR
    return True


async def close_writer(writer: asyncio.StreamWriter, grace: float = _CLOSE_TIMEOUT) -> None:
    """Closes without ever hanging: a peer that stops reading would keep a flushing close open."""
    writer.close()
    try:
        async with asyncio.timeout(grace):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass


async def serve_agent_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    computation_id: str,
    publish: Callable[[ClientStreamMessage], None],
    pace: Callable[[str], Awaitable[None] | None] | None = None,
) -> int:
    """Publishes one agent connection's messages; returns how many were published.

    A misbehaving agent costs only its own connection: every failure is logged once and the
    connection closed, so nothing but cancellation escapes to the listener. `pace` (e.g.
    EventBus.pace) is asked after each message and what it returns, if anything, awaited:
    while it waits, nothing more is read, so a fast agent is slowed down through its socket
    instead of losing messages. The rest of a read's batch, already acked, is published even
    when the wait is cancelled.
    """
    log = get_logger(computation_id=computation_id)
    published = forged = 0
    try:
        async with contextlib.aclosing(read_agent_batches(reader, writer)) as batches:
            async for batch in batches:
                for index, message in enumerate(batch):
                    if _stamp(message, computation_id):
                        forged += 1
                        if forged == 1:  # once per connection: a guest cannot flood the log
                            log.warning(
                                "agent event claimed originator 'manager'; rewritten to 'agent'",
                                event_type=message.agent_event.event_type,
                            )
                    publish(message)
                    published += 1
                    waiting = None if pace is None else pace(computation_id)
                    if waiting is not None:
                        try:
                            await waiting
                        except BaseException:
                            for rest in batch[index + 1 :]:
                                _stamp(rest, computation_id)
                                publish(rest)
                                published += 1
                            raise
    except AgentProtocolError as error:
        log.warning("agent broke the event protocol; connection closed", reason=str(error))
    except OSError as error:
        log.warning("agent event connection failed", reason=str(error) or type(error).__name__)
    except Exception as error:
        log.warning("agent event connection aborted", reason=f"{type(error).__name__}: {error}")
    finally:
        await close_writer(writer)
    return published


def _stamp(message: ClientStreamMessage, computation_id: str) -> bool:
    """`stamp` and `disown_manager` in one look at the message (it is on every agent message's
    path); True if it disowned a claim to be the Manager."""
    if message.WhichOneof("message") == "agent_log":
        message.agent_log.computation_id = computation_id
        return False
    event = message.agent_event
    event.computation_id = computation_id
    if event.originator.strip().lower() != MANAGER_ORIGINATOR:
        return False
    event.originator = AGENT_ORIGINATOR
    return True
