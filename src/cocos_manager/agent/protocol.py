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


class _Acks:
    """Acks of accepted frames, written together when the event loop comes round: one write
    for all the frames of a read instead of a system call per frame. Flushed at the end."""

    def __init__(self, writer: AckWriter) -> None:
        self._writer = writer
        self._pending = bytearray()
        self._scheduled = False

    def add(self, message_id: int) -> None:
        self._pending += _ACK.pack(message_id)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            self._writer.write(pending)


async def _read_framed(
    reader: asyncio.StreamReader, writer: AckWriter, first: bytes
) -> AsyncGenerator[ClientStreamMessage, None]:
    acks = _Acks(writer)
    try:
        while True:
            if first:
                header = first + await _read_exactly(reader, _HEADER.size - 1, "a frame header")
                first = b""
            else:
                try:
                    header = await reader.readexactly(_HEADER.size)
                except asyncio.IncompleteReadError as error:
                    if not error.partial:
                        return  # EOF at a frame boundary
                    raise AgentProtocolError(
                        f"stream ended inside a frame header ({len(error.partial)} of "
                        f"{_HEADER.size} bytes)"
                    ) from None
            message_id, length = _HEADER.unpack(header)
            if length > MAX_FRAME:
                raise AgentProtocolError(
                    f"frame {message_id} claims {length} bytes (max {MAX_FRAME})"
                )
            message = _parse(await _read_exactly(reader, length, f"frame {message_id}"))
            acks.add(message_id)
            await writer.drain()
            yield message
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
) -> AsyncGenerator[ClientStreamMessage, None]:
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
        yield _parse_legacy(tag, body)
        first = b""


def _parse_legacy(tag: int, body: bytes) -> ClientStreamMessage:
    try:
        if tag == _AGENT_LOG_TAG:
            return ClientStreamMessage(agent_log=AgentLog.FromString(body))
        return ClientStreamMessage(agent_event=AgentEvent.FromString(body))
    except (DecodeError, ValueError, RuntimeError) as error:
        raise AgentProtocolError(f"payload is not a ClientStreamMessage: {error}") from None


async def read_agent_messages(
    reader: asyncio.StreamReader, writer: AckWriter
) -> AsyncGenerator[ClientStreamMessage, None]:
    """Yields the agent's messages until EOF at a message boundary.

    Raises AgentProtocolError on a contract breach; transport failures (OSError) pass through.
    Framed messages are acked after they parse and before they are yielded: an ack means the
    manager accepted the message, not that a client has seen it.
    """
    first = await reader.read(1)
    if not first:
        return
    messages = (
        _read_legacy(reader, first)
        if first[0] in LEGACY_TAGS
        else _read_framed(reader, writer, first)
    )
    async with contextlib.aclosing(messages):
        async for message in messages:
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
    pace: Callable[[str], Awaitable[None]] | None = None,
) -> int:
    """Publishes one agent connection's messages; returns how many were published.

    A misbehaving agent costs only its own connection: every failure is logged once and the
    connection closed, so nothing but cancellation escapes to the listener. `pace` (e.g.
    EventBus.wait_for_room) is awaited after each message: while it waits, nothing more is
    read, so a fast agent is slowed down through its socket instead of losing messages.
    """
    log = get_logger(computation_id=computation_id)
    published = forged = 0
    try:
        async with contextlib.aclosing(read_agent_messages(reader, writer)) as messages:
            async for message in messages:
                if disown_manager(message):
                    forged += 1
                    if forged == 1:  # once per connection: a guest cannot flood the log
                        log.warning(
                            "agent event claimed originator 'manager'; rewritten to 'agent'",
                            event_type=message.agent_event.event_type,
                        )
                publish(stamp(message, computation_id))
                published += 1
                if pace is not None:
                    await pace(computation_id)
    except AgentProtocolError as error:
        log.warning("agent broke the event protocol; connection closed", reason=str(error))
    except OSError as error:
        log.warning("agent event connection failed", reason=str(error) or type(error).__name__)
    except Exception as error:
        log.warning("agent event connection aborted", reason=f"{type(error).__name__}: {error}")
    finally:
        await close_writer(writer)
    return published
