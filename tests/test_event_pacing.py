"""Agent connections are paced by the Events subscribers (EventBus.wait_for_room): a burst
from an agent reaches a subscriber that is reading, however slowly, without losses, while a
subscriber that has stopped reading holds nobody back."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from cocos_manager import events
from cocos_manager.agent_protocol import serve_agent_connection
from cocos_manager.api.manager_pb2 import AgentLog, ClientStreamMessage
from cocos_manager.events import EventBus, Subscription

GUARD = 10.0


def log(text: str, computation_id: str = "c1") -> ClientStreamMessage:
    return ClientStreamMessage(agent_log=AgentLog(message=text, computation_id=computation_id))


def frame(message_id: int, message: ClientStreamMessage) -> bytes:
    body = message.SerializeToString()
    return struct.pack("<II", message_id, len(body)) + body


async def test_no_backlog_no_wait() -> None:
    bus = EventBus(queue_size=8)
    bus.subscribe()
    for i in range(4):  # exactly half full: not over
        bus.publish(log(str(i)))
    await asyncio.wait_for(bus.wait_for_room("c1"), 0.05)


async def test_waits_while_a_reading_subscriber_has_a_backlog() -> None:
    bus = EventBus(queue_size=8)
    subscription = bus.subscribe()
    for i in range(8):
        bus.publish(log(str(i)))
    waiting = asyncio.ensure_future(bus.wait_for_room("c1"))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    stream = aiter(subscription)
    for _ in range(4):  # down to half: not enough
        await anext(stream)
    await asyncio.sleep(0.02)
    assert not waiting.done()
    for _ in range(2):  # down to a quarter
        await anext(stream)
    await asyncio.wait_for(waiting, 0.5)  # well before a stall would let it go
    assert subscription.queue.qsize() == 2


async def test_a_subscriber_that_stopped_reading_holds_nobody_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "STALLED_AFTER", 0.05)
    bus = EventBus(queue_size=8)
    bus.subscribe()  # never read
    for i in range(8):
        bus.publish(log(str(i)))
    await asyncio.wait_for(bus.wait_for_room("c1"), GUARD)  # after about STALLED_AFTER


async def test_an_idle_subscriber_is_not_taken_for_a_stalled_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waiting long for the first message is not stalling: the clock starts with a backlog."""
    monkeypatch.setattr(events, "STALLED_AFTER", 0.05)
    bus = EventBus(queue_size=8)
    bus.subscribe()
    await asyncio.sleep(0.1)
    for i in range(8):
        bus.publish(log(str(i)))
    waiting = asyncio.ensure_future(bus.wait_for_room("c1"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await asyncio.wait_for(waiting, GUARD)


async def test_only_subscribers_of_that_computation_hold_it_back() -> None:
    bus = EventBus(queue_size=8)
    bus.subscribe("c2")
    for i in range(8):
        bus.publish(log(str(i), computation_id="c2"))
    await asyncio.wait_for(bus.wait_for_room("c1"), 0.05)


async def test_a_burst_reaches_a_slow_subscriber_without_losses() -> None:
    bus = EventBus(queue_size=16)
    subscription: Subscription = bus.subscribe()
    manager_end, agent_end = socket.socketpair()
    manager_end.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=manager_end)
    count = 200
    serving = asyncio.ensure_future(
        serve_agent_connection(reader, writer, "c1", bus.publish, bus.wait_for_room)
    )
    agent_reader, agent_writer = await asyncio.open_connection(sock=agent_end)
    agent_writer.write(b"".join(frame(i + 1, log(f"m{i}", "forged")) for i in range(count)))
    agent_writer.write_eof()
    received = []
    async for message in subscription:
        received.append(message.agent_log.message)
        assert message.agent_log.computation_id == "c1"
        if len(received) == count:
            break
        if len(received) % 10 == 0:
            await asyncio.sleep(0.001)  # a slow reader
    assert received == [f"m{i}" for i in range(count)]
    assert bus.dropped == 0
    assert await asyncio.wait_for(serving, GUARD) == count
    acks = await asyncio.wait_for(agent_reader.read(), GUARD)
    assert acks == b"".join(struct.pack("<I", i + 1) for i in range(count))
    agent_writer.close()
