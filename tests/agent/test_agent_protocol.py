"""The agent event/log stream and the vsock transport, over real sockets (docs/contracts.md, "Agent channel")."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cocos_manager.agent.protocol import (
    MAX_FRAME,
    AgentProtocolError,
    read_agent_messages,
    serve_agent_connection,
    stamp,
)
from cocos_manager.agent.vsock import (
    AGENT_EVENTS_PORT,
    AGENT_MANIFEST_PORT,
    AgentEventListener,
    HandoverAborted,
    HandoverFailed,
    HandoverTimeout,
    send_manifest,
    vsock_connector,
)
from cocos_manager.proto.manager_pb2 import (
    AgentEvent,
    AgentLog,
    ClientStreamMessage,
    RunResponse,
)
from tests.support.streams import AckSink
from tests.support.waiting import wait_for

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


GUARD = 10.0  # turns a hang into a failure; never reached by a passing test


def log_message(text: str, computation_id: str = "claimed-by-agent") -> ClientStreamMessage:
    return ClientStreamMessage(
        agent_log=AgentLog(message=text, computation_id=computation_id, level="info")
    )


def event_message(status: str, computation_id: str = "claimed-by-agent") -> ClientStreamMessage:
    return ClientStreamMessage(
        agent_event=AgentEvent(
            event_type="algorithm-run",
            computation_id=computation_id,
            details=b"\x00\xff",
            originator="agent",
            status=status,
        )
    )


def frame(message_id: int, payload: bytes | ClientStreamMessage) -> bytes:
    body = payload.SerializeToString() if isinstance(payload, ClientStreamMessage) else payload
    return struct.pack("<II", message_id, len(body)) + body


def ack(*ids: int) -> bytes:
    return b"".join(struct.pack("<I", i) for i in ids)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Streams, Streams]]:
    """(manager side, agent side) of a connected unix socketpair."""
    a, b = socket.socketpair()
    manager = await asyncio.open_connection(sock=a)
    agent = await asyncio.open_connection(sock=b)
    yield manager, agent
    for _, writer in (manager, agent):
        writer.close()


async def collect(
    streams: Streams | tuple[asyncio.StreamReader, AckSink],
) -> list[ClientStreamMessage]:
    async def run() -> list[ClientStreamMessage]:
        return [m async for m in read_agent_messages(*streams)]

    return await asyncio.wait_for(run(), GUARD)


async def send(agent: Streams, *chunks: bytes, pause: float = 0.0, eof: bool = True) -> None:
    _, writer = agent
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    if eof:
        writer.write_eof()


# -- framed -----------------------------------------------------------------------------------


async def test_framed_messages_are_acked_byte_for_byte(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    sent = [log_message("one"), event_message("started"), log_message("three")]
    await send(agent, *(frame(i, m) for i, m in zip((1, 2, 0xDEADBEEF), sent, strict=True)))
    assert await collect(manager) == sent
    assert await agent[0].readexactly(12) == b"\x01\0\0\0\x02\0\0\0\xef\xbe\xad\xde"


async def test_ack_is_written_before_the_next_frame_arrives(pair: tuple[Streams, Streams]) -> None:
    """An agent waiting for its ack before sending more must not deadlock the manager."""
    manager, agent = pair
    messages = read_agent_messages(*manager)
    for message_id in range(1, 4):
        await send(agent, frame(message_id, log_message(str(message_id))), eof=False)
        got = await asyncio.wait_for(anext(messages), GUARD)
        assert got.agent_log.message == str(message_id)
        assert await asyncio.wait_for(agent[0].readexactly(4), GUARD) == ack(message_id)
    await send(agent)
    assert await collect_rest(messages) == []


async def collect_rest(messages: AsyncIterator[ClientStreamMessage]) -> list[ClientStreamMessage]:
    async def run() -> list[ClientStreamMessage]:
        return [m async for m in messages]

    return await asyncio.wait_for(run(), GUARD)


async def test_several_frames_in_one_write(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    sent = [log_message(f"m{i}") for i in range(20)]
    await send(agent, b"".join(frame(i + 1, m) for i, m in enumerate(sent)))
    assert await collect(manager) == sent
    assert await agent[0].readexactly(80) == ack(*range(1, 21))


async def test_frames_split_across_many_small_writes(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    sent = [event_message("a" * 300), log_message("b"), event_message("")]
    stream = b"".join(frame(i + 1, m) for i, m in enumerate(sent))
    reading = asyncio.ensure_future(collect(manager))
    await send(agent, *(stream[i : i + 3] for i in range(0, len(stream), 3)), pause=0.0005)
    assert await reading == sent
    assert await agent[0].readexactly(12) == ack(1, 2, 3)


def largest_message() -> ClientStreamMessage:
    message = log_message("x" * (MAX_FRAME - 100))
    message.agent_log.message += "x" * (MAX_FRAME - len(message.SerializeToString()))
    assert len(message.SerializeToString()) == MAX_FRAME
    return message


async def test_largest_frame_is_accepted(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    big = largest_message()
    reading = asyncio.ensure_future(collect(manager))
    await send(agent, frame(1, big))
    assert await reading == [big]


async def test_largest_legacy_message_is_accepted(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    big = largest_message()
    reading = asyncio.ensure_future(collect(manager))
    await send(agent, big.SerializeToString())
    assert await reading == [big]


async def test_oversized_length_fails_before_the_payload_is_read(
    pair: tuple[Streams, Streams],
) -> None:
    """No payload follows and the stream stays open: reading it would hang, not fail."""
    manager, agent = pair
    await send(agent, struct.pack("<II", 1, MAX_FRAME + 1), eof=False)
    with pytest.raises(AgentProtocolError, match="claims 1048577 bytes"):
        await collect(manager)


async def test_oversized_length_leaves_the_payload_unread() -> None:
    """Frames are parsed out of whole reads, so the bytes of the read that brought the header
    are taken; nothing past that read is."""
    reader = asyncio.StreamReader()
    payload = b"p" * (1 << 20)
    reader.feed_data(struct.pack("<II", 7, 0xFFFFFFFF) + payload)
    with pytest.raises(AgentProtocolError):
        await collect((reader, AckSink()))
    left = await reader.read(len(payload))
    assert len(left) >= len(payload) - (64 << 10)


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"\x01\0\0", id="mid-header"),
        pytest.param(struct.pack("<I", 1), id="after-id"),
        pytest.param(frame(1, log_message("cut"))[:-2], id="mid-payload"),
        pytest.param(frame(1, log_message("ok")) + b"\x02\0", id="mid-second-header"),
    ],
)
async def test_eof_inside_a_frame_is_an_error(pair: tuple[Streams, Streams], stream: bytes) -> None:
    manager, agent = pair
    await send(agent, stream)
    with pytest.raises(AgentProtocolError, match="stream ended inside"):
        await collect(manager)


async def test_eof_at_a_boundary_ends_cleanly(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    await send(agent)
    assert await collect(manager) == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"\xff\xff\xff\xff", "not a ClientStreamMessage", id="garbage"),
        pytest.param(b"", "carries nothing", id="empty"),
        pytest.param(
            ClientStreamMessage(run_res=RunResponse(agent_port="7002")).SerializeToString(),
            "carries run_res",
            id="run-res",
        ),
        pytest.param(b"\x0a\x02\x0a\xff", "not a ClientStreamMessage", id="invalid-utf8"),
    ],
)
async def test_bad_payload_is_rejected_and_not_acked(
    pair: tuple[Streams, Streams], payload: bytes, reason: str
) -> None:
    manager, agent = pair
    await send(agent, frame(1, log_message("fine")), frame(2, payload))
    got: list[ClientStreamMessage] = []
    with pytest.raises(AgentProtocolError, match=reason):
        async for message in read_agent_messages(*manager):
            got.append(message)
    assert got == [log_message("fine")]
    manager[1].close()
    assert await agent[0].read() == ack(1)


# -- legacy (unframed) ------------------------------------------------------------------------


async def test_legacy_one_message_per_write_gets_no_acks(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    sent = [log_message("boot"), event_message("running"), log_message("done")]
    await send(agent, *(m.SerializeToString() for m in sent), pause=0.01)
    assert await collect(manager) == sent
    manager[1].close()
    assert await agent[0].read() == b""


async def test_legacy_writes_that_coalesce_are_still_separate_messages(
    pair: tuple[Streams, Streams],
) -> None:
    """The original parsed each read as one message and lost these."""
    manager, agent = pair
    sent = [log_message(f"line {i}") for i in range(10)] + [event_message("x" * 5000)]
    await send(agent, b"".join(m.SerializeToString() for m in sent))
    assert await collect(manager) == sent


async def test_legacy_message_split_across_writes(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    sent = event_message("y" * 2000)
    data = sent.SerializeToString()
    reading = asyncio.ensure_future(collect(manager))
    await send(agent, *(data[i : i + 100] for i in range(0, len(data), 100)), pause=0.0005)
    assert await reading == [sent]


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        pytest.param(
            ClientStreamMessage(run_res=RunResponse(computation_id="c")).SerializeToString(),
            "carries run_res",
            id="run-res",
        ),
        pytest.param(
            log_message("ok").SerializeToString() + b"\x22\x00", "field tag 0x22", id="bad-tag"
        ),
        pytest.param(b"\x0a" + b"\xff" * 11, "varint", id="endless-varint"),
        pytest.param(b"\x12\xfd\xff\x3f", "claims 1048577 bytes", id="too-long"),
        pytest.param(log_message("cut").SerializeToString()[:-1], "stream ended inside", id="eof"),
        pytest.param(b"\x0a\x03\xff\xff\xff", "not a ClientStreamMessage", id="garbage"),
    ],
)
async def test_legacy_errors(pair: tuple[Streams, Streams], stream: bytes, reason: str) -> None:
    manager, agent = pair
    await send(agent, stream)
    with pytest.raises(AgentProtocolError, match=reason):
        await collect(manager)


# -- first-byte detection ---------------------------------------------------------------------


@pytest.mark.parametrize("message_id", [0, 1, 2, 9, 0x0B, 0x11, 0x1B, 0xFF, 0x0A0B0C0D])
async def test_framed_first_ids(pair: tuple[Streams, Streams], message_id: int) -> None:
    manager, agent = pair
    await send(agent, frame(message_id, log_message("hi")))
    assert await collect(manager) == [log_message("hi")]
    assert await agent[0].readexactly(4) == ack(message_id)


@pytest.mark.parametrize("tag", [0x0A, 0x12, 0x1A])
async def test_first_id_that_looks_like_a_field_tag_is_read_as_legacy(
    pair: tuple[Streams, Streams], tag: int
) -> None:
    """The documented limit of first-byte detection; only the first id matters."""
    manager, agent = pair
    await send(agent, frame(tag, log_message("hi")))
    with pytest.raises(AgentProtocolError):
        await collect(manager)


async def test_later_ids_that_look_like_field_tags_are_fine(
    pair: tuple[Streams, Streams],
) -> None:
    manager, agent = pair
    await send(agent, *(frame(i, log_message(str(i))) for i in (1, 0x0A, 0x12, 0x1A)))
    assert [m.agent_log.message for m in await collect(manager)] == ["1", "10", "18", "26"]


# -- stamping and serving ---------------------------------------------------------------------


def test_stamp_overwrites_the_agents_claim() -> None:
    assert stamp(log_message("x", "other"), "mine").agent_log.computation_id == "mine"
    assert stamp(event_message("x", "other"), "mine").agent_event.computation_id == "mine"
    assert stamp(event_message("x", ""), "mine").agent_event.computation_id == "mine"


async def test_serve_publishes_in_order_with_the_assigned_id(
    pair: tuple[Streams, Streams],
) -> None:
    manager, agent = pair
    sent = [
        log_message(f"l{i}", "other") if i % 3 else event_message(f"e{i}", "other")
        for i in range(50)
    ]
    published: list[ClientStreamMessage] = []
    await send(agent, *(frame(i, m) for i, m in enumerate(sent, start=1)))
    count = await asyncio.wait_for(
        serve_agent_connection(*manager, "comp-1", published.append), GUARD
    )
    assert count == 50
    assert [m.WhichOneof("message") for m in published] == [m.WhichOneof("message") for m in sent]
    assert [m.agent_log.message or m.agent_event.status for m in published] == [
        m.agent_log.message or m.agent_event.status for m in sent
    ]
    assert {(m.agent_log.computation_id or m.agent_event.computation_id) for m in published} == {
        "comp-1"
    }
    assert manager[1].is_closing()
    assert await agent[0].read() == ack(*range(1, 51))


async def test_an_agent_cannot_forge_the_managers_events(pair: tuple[Streams, Streams]) -> None:
    """originator "manager" (any case, padded) from a guest becomes "agent": the event is
    kept, the claim is not, and the connection logs it once however often it is tried."""
    manager, agent = pair
    sent = []
    for i, claim in enumerate(["manager", "Manager", " MANAGER ", "agent", "manager"]):
        message = event_message(f"s{i}")
        message.agent_event.event_type = "vm-exit"
        message.agent_event.originator = claim
        sent.append(message)
    published: list[ClientStreamMessage] = []
    await send(agent, *(frame(i, m) for i, m in enumerate(sent, start=1)))
    with capture_logs() as logs:
        count = await asyncio.wait_for(
            serve_agent_connection(*manager, "comp-1", published.append), GUARD
        )
    assert count == 5
    assert [m.agent_event.originator for m in published] == ["agent"] * 5
    assert [m.agent_event.status for m in published] == [f"s{i}" for i in range(5)]
    forged = [entry for entry in logs if "originator" in entry["event"]]
    assert len(forged) == 1 and forged[0]["computation_id"] == "comp-1"


async def test_serve_never_raises_logs_once_and_closes(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    published: list[ClientStreamMessage] = []
    await send(agent, frame(1, log_message("ok")), frame(2, b"\xff\xff"), eof=False)
    with capture_logs() as logs:
        count = await asyncio.wait_for(
            serve_agent_connection(*manager, "comp-2", published.append), GUARD
        )
    assert count == 1 and len(published) == 1
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert logs[0]["computation_id"] == "comp-2"
    assert "not a ClientStreamMessage" in logs[0]["reason"]
    assert manager[1].is_closing()
    assert await asyncio.wait_for(agent[0].read(), GUARD) == ack(1)  # EOF: the manager closed


async def test_serve_survives_a_failing_publish(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair

    def publish(_: ClientStreamMessage) -> None:
        raise RuntimeError("bus is gone")

    await send(agent, frame(1, log_message("ok")), eof=False)
    with capture_logs() as logs:
        count = await asyncio.wait_for(serve_agent_connection(*manager, "c", publish), GUARD)
    assert count == 0
    assert len(logs) == 1 and "bus is gone" in logs[0]["reason"]
    assert manager[1].is_closing()


async def test_serve_survives_a_reset_connection(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    sock = agent[1].get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await send(agent, frame(1, log_message("partial"))[:5], eof=False)
    agent[1].transport.abort()
    with capture_logs() as logs:
        count = await asyncio.wait_for(serve_agent_connection(*manager, "c", lambda _: None), GUARD)
    assert count == 0
    assert len(logs) == 1
    assert manager[1].is_closing()


async def test_serve_lets_cancellation_through_and_still_closes(
    pair: tuple[Streams, Streams],
) -> None:
    manager, agent = pair
    task = asyncio.ensure_future(serve_agent_connection(*manager, "c", lambda _: None))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert manager[1].is_closing()
    assert await asyncio.wait_for(agent[0].read(), GUARD) == b""


# -- the listener -----------------------------------------------------------------------------


async def test_listener_serves_a_known_cid(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    published: list[ClientStreamMessage] = []
    listener = AgentEventListener({5: "comp-5"}.get, published.append)
    await send(agent, frame(1, log_message("hello", "comp-666")))
    assert await asyncio.wait_for(listener.serve(*manager, 5), GUARD) == 1
    assert published == [log_message("hello", "comp-5")]
    assert listener.connections == 0


async def test_listener_caps_the_connections_of_one_cid() -> None:
    """A guest opening connection after connection gets at most max_per_cid served at once;
    the rest are closed (logged once), other CIDs are unaffected, and a freed place is
    taken again."""
    published: list[ClientStreamMessage] = []
    listener = AgentEventListener({5: "comp-5", 6: "comp-6"}.get, published.append, max_per_cid=2)
    opened: list[tuple[Streams, Streams]] = []

    async def connect(cid: int) -> tuple[asyncio.Task[int], Streams]:
        a, b = socket.socketpair()
        manager = await asyncio.open_connection(sock=a)
        agent = await asyncio.open_connection(sock=b)
        opened.append((manager, agent))
        return asyncio.ensure_future(listener.serve(*manager, cid)), agent

    try:
        held = [await connect(5) for _ in range(2)]
        while listener.connections_of(5) < 2:
            await asyncio.sleep(0)
        with capture_logs() as logs:
            refused = [await connect(5) for _ in range(3)]
            for task, agent in refused:
                assert await asyncio.wait_for(task, GUARD) == 0
                assert await asyncio.wait_for(agent[0].read(), GUARD) == b""  # closed at once
        assert [entry["event"] for entry in logs] == [
            "agent connection over the limit for its CID; closed"
        ]
        other, other_agent = await connect(6)  # another guest is not affected
        await send(other_agent, frame(1, log_message("from 6")))
        assert await asyncio.wait_for(other, GUARD) == 1

        first, first_agent = held[0]
        await send(first_agent, frame(1, log_message("from 5")))
        assert await asyncio.wait_for(first, GUARD) == 1
        again, again_agent = await connect(5)  # a place is free again
        await send(again_agent, frame(1, log_message("again")))
        assert await asyncio.wait_for(again, GUARD) == 1
        assert [m.agent_log.message for m in published] == ["from 6", "from 5", "again"]
    finally:
        await listener.close()
        for manager, agent in opened:
            manager[1].close()
            agent[1].close()


async def test_listener_closes_an_unknown_cid(pair: tuple[Streams, Streams]) -> None:
    manager, agent = pair
    published: list[ClientStreamMessage] = []
    listener = AgentEventListener({5: "comp-5"}.get, published.append)
    await send(agent, frame(1, log_message("hello")), eof=False)
    with capture_logs() as logs:
        assert await asyncio.wait_for(listener.serve(*manager, 6), GUARD) == 0
    assert published == []
    assert len(logs) == 1 and logs[0]["cid"] == 6
    assert await read_until_closed(agent[0]) == b""  # nothing acked


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What arrived before the peer closed; closing with unread input may reset, not EOF."""
    try:
        return await asyncio.wait_for(reader.read(), GUARD)
    except ConnectionResetError:
        return b""


async def test_listener_close_and_disconnect_end_open_connections() -> None:
    listener = AgentEventListener(lambda cid: f"comp-{cid}", lambda _: None)
    agents: list[Streams] = []
    tasks: list[asyncio.Task[int]] = []
    for cid in (3, 3, 4):
        a, b = socket.socketpair()
        manager = await asyncio.open_connection(sock=a)
        agents.append(await asyncio.open_connection(sock=b))
        tasks.append(asyncio.ensure_future(listener.serve(*manager, cid)))
    await wait_for(lambda: listener.connections == 3, "the three connections to be served")
    assert listener.disconnect(3) == 2
    await asyncio.wait(tasks[:2])
    assert listener.connections == 1 and not tasks[2].done()
    await listener.close()
    assert all(task.cancelled() for task in tasks)
    for reader, writer in agents:
        assert await asyncio.wait_for(reader.read(), GUARD) == b""
        writer.close()


def _vsock_bind_works() -> bool:
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
            sock.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
    except (AttributeError, OSError):
        return False
    return True


async def test_listener_start_either_listens_or_warns_once() -> None:
    listener = AgentEventListener(lambda _: None, lambda _: None, port=socket.VMADDR_PORT_ANY)
    with capture_logs() as logs:
        started = await listener.start()
    assert started == _vsock_bind_works() == listener.listening
    assert len(logs) == (0 if started else 1)
    await listener.close()
    assert not listener.listening


@pytest.mark.skipif(not _vsock_bind_works(), reason="AF_VSOCK cannot bind on this host")
async def test_listener_start_on_a_taken_port_warns_once() -> None:
    first = AgentEventListener(lambda _: None, lambda _: None, port=socket.VMADDR_PORT_ANY)
    assert await first.start()
    assert first._server is not None
    port = first._server.sockets[0].getsockname()[1]
    second = AgentEventListener(lambda _: None, lambda _: None, port=port)
    with capture_logs() as logs:
        assert not await second.start()
    assert len(logs) == 1 and logs[0]["log_level"] == "warning"
    await first.close()
    await second.close()


def test_ports() -> None:
    assert (AGENT_MANIFEST_PORT, AGENT_EVENTS_PORT) == (9999, 9997)


# -- manifest hand-over -----------------------------------------------------------------------


class RefusingThenAccepting:
    """A unix socket that refuses (bound, not listening) until ``refusals`` attempts were made."""

    def __init__(self, path: Path, refusals: int) -> None:
        self.path = path
        self.refusals = refusals
        self.attempts = 0
        self.received = asyncio.get_running_loop().create_future()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received.set_result(await reader.read())
        writer.close()

    async def connect(self) -> Streams:
        self.attempts += 1
        if self.attempts > self.refusals and self.server is None:
            self.sock.listen()
            self.server = await asyncio.start_server(self._handle, sock=self.sock)
        return await asyncio.open_unix_connection(str(self.path))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.sock.close()


@pytest.fixture
async def never_done() -> AsyncIterator[asyncio.Future[Any]]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    yield future
    future.cancel()


async def test_send_manifest_retries_until_the_agent_listens(
    tmp_path: Path, never_done: asyncio.Future[Any]
) -> None:
    agent = RefusingThenAccepting(tmp_path / "agent.sock", refusals=4)
    payload = bytes(range(256)) * 2000  # bigger than a socket buffer: exercises drain
    try:
        attempts = await send_manifest(
            agent.connect, payload, abort=never_done, initial_delay=0.001, timeout=30
        )
        assert attempts == agent.attempts == 5
        assert await asyncio.wait_for(agent.received, GUARD) == payload
    finally:
        await agent.close()
    assert not never_done.done()  # only watched, never consumed


async def test_send_manifest_first_try(tmp_path: Path) -> None:
    agent = RefusingThenAccepting(tmp_path / "agent.sock", refusals=0)
    try:
        assert await send_manifest(agent.connect, b"{}", abort=asyncio.Event(), timeout=30) == 1
        assert await asyncio.wait_for(agent.received, GUARD) == b"{}"
    finally:
        await agent.close()


@pytest.mark.parametrize("kind", ["future", "event"])
async def test_send_manifest_gives_up_when_qemu_exits_while_retrying(
    tmp_path: Path, kind: str
) -> None:
    """With timeout=30 a missed abort would end in HandoverTimeout, not HandoverAborted."""
    agent = RefusingThenAccepting(tmp_path / "agent.sock", refusals=1_000_000)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    event = asyncio.Event()
    exited = future if kind == "future" else event

    def fire() -> None:
        future.set_result(0)
        event.set()

    connect = agent.connect

    async def refuse_then_exit() -> Streams:
        try:
            return await connect()
        finally:
            if agent.attempts == 1:
                fire()

    try:
        with pytest.raises(HandoverAborted, match="after 1 attempt"):
            await send_manifest(refuse_then_exit, b"{}", abort=exited, timeout=30, max_delay=5)
    finally:
        await agent.close()


async def test_send_manifest_abort_interrupts_a_hanging_connect() -> None:
    exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    connect_cancelled = asyncio.Event()

    async def hang() -> Streams:
        exited.set_result("qemu died")
        try:
            await asyncio.Event().wait()
        finally:
            connect_cancelled.set()
        raise AssertionError("unreachable")

    with pytest.raises(HandoverAborted):
        await send_manifest(hang, b"{}", abort=exited, timeout=30)
    assert connect_cancelled.is_set()


async def test_send_manifest_aborted_before_start() -> None:
    exited = asyncio.Event()
    exited.set()
    attempts = 0

    async def connect() -> Streams:
        nonlocal attempts
        attempts += 1
        raise AssertionError("must not connect")

    with pytest.raises(HandoverAborted):
        await send_manifest(connect, b"{}", abort=exited, timeout=30)
    assert attempts == 0


async def test_send_manifest_times_out(tmp_path: Path, never_done: asyncio.Future[Any]) -> None:
    agent = RefusingThenAccepting(tmp_path / "agent.sock", refusals=1_000_000)
    try:
        with pytest.raises(HandoverTimeout, match="ConnectionRefusedError") as raised:
            await send_manifest(
                agent.connect, b"{}", abort=never_done, initial_delay=0.01, timeout=1.0
            )
    finally:
        await agent.close()
    assert agent.attempts >= 2
    assert f"{agent.attempts} attempt(s)" in str(raised.value)


async def test_send_manifest_stops_on_a_permanent_error(never_done: asyncio.Future[Any]) -> None:
    attempts = 0

    async def no_vsock() -> Streams:
        nonlocal attempts
        attempts += 1
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    with pytest.raises(HandoverFailed, match="not supported"):
        await send_manifest(no_vsock, b"{}", abort=never_done, timeout=30)
    assert attempts == 1


@pytest.mark.parametrize(
    "code", [errno.ECONNRESET, errno.ENODEV, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENOENT]
)
async def test_send_manifest_retries_transient_errors(
    tmp_path: Path, never_done: asyncio.Future[Any], code: int
) -> None:
    agent = RefusingThenAccepting(tmp_path / "agent.sock", refusals=0)
    attempts = 0

    async def flaky() -> Streams:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise OSError(code, "transient")
        return await agent.connect()

    try:
        assert (
            await send_manifest(flaky, b"m", abort=never_done, initial_delay=0.001, timeout=30) == 3
        )
        assert await asyncio.wait_for(agent.received, GUARD) == b"m"
    finally:
        await agent.close()


async def test_vsock_connector_reports_an_unreachable_cid_as_oserror() -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK on this platform")
    connect = vsock_connector(0x7FFF_FFF0)  # no guest has this CID
    with pytest.raises(OSError) as raised:
        await asyncio.wait_for(connect(), GUARD)
    if raised.value.errno is None:  # wait_for's own TimeoutError
        pytest.skip("vsock connect does not fail fast on this host")


async def test_a_read_is_acked_and_published_whole_when_the_wait_is_cancelled(
    pair: tuple[Streams, Streams],
) -> None:
    """Frames are acked a read at a time; a pace wait after the first of them that is cancelled
    (the VM released, the daemon stopping) still publishes the rest: nothing acked is lost."""
    manager, agent = pair
    published: list[ClientStreamMessage] = []
    forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    await send(agent, b"".join(frame(i, log_message(f"m{i}")) for i in range(1, 6)), eof=False)
    task = asyncio.ensure_future(
        serve_agent_connection(*manager, "c", published.append, lambda _: forever)
    )
    while not published:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, GUARD)
    assert [m.agent_log.message for m in published] == [f"m{i}" for i in range(1, 6)]
    assert await asyncio.wait_for(agent[0].read(), GUARD) == ack(*range(1, 6))
