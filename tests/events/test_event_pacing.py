"""Agent connections are paced by the Events subscribers (EventBus.wait_for_room): a burst
from an agent reaches a subscriber that is reading without losses; only subscribers with a
backlog of the agent's own computation hold it back, for a bounded time, and a held agent is
woken by the drain, not by polling."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Coroutine
from typing import Any

import pytest

from cocos_manager.agent.protocol import serve_agent_connection
from cocos_manager.events.bus import EventBus
from cocos_manager.events.subscription import Subscription
from cocos_manager.proto.manager_pb2 import AgentLog, ClientStreamMessage

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
    assert returns_at_once(bus.wait_for_room("c1"))


def returns_at_once(awaitable: Coroutine[Any, Any, None]) -> bool:
    """True if it finishes without ever giving the loop back (no wait, not even a short one)."""
    try:
        awaitable.send(None)
    except StopIteration:
        return True
    awaitable.close()
    return False


async def spin(turns: int = 100) -> None:
    """Lets the loop go round: a polling waiter would look again on each turn."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_waits_while_a_reading_subscriber_has_a_backlog() -> None:
    bus = EventBus(queue_size=8)
    subscription = bus.subscribe()
    for i in range(8):
        bus.publish(log(str(i)))
    waiting = asyncio.ensure_future(bus.wait_for_room("c1"))
    await spin()
    assert not waiting.done()
    stream = aiter(subscription)
    for _ in range(4):  # down to half: not enough
        await anext(stream)
    await spin()
    assert not waiting.done()
    for _ in range(2):  # down to a quarter
        await anext(stream)
    await asyncio.wait_for(waiting, GUARD)
    assert subscription.qsize() == 2
    assert bus.hold_wakeups == 1  # woken once, by the drain that made room
    assert bus.hold_timeouts == 0


async def test_waiting_is_event_driven_not_polled() -> None:
    """While nobody reads, a held agent is not woken at all, however long the loop runs."""
    bus = EventBus(queue_size=8, hold_timeout=3600)
    subscription = bus.subscribe()
    for i in range(8):
        bus.publish(log(str(i)))
    waiting = asyncio.ensure_future(bus.wait_for_room("c1"))
    await spin(1000)
    assert not waiting.done() and bus.hold_wakeups == 0
    stream = aiter(subscription)
    for _ in range(6):
        await anext(stream)
        await spin(10)
    await asyncio.wait_for(waiting, GUARD)
    assert bus.hold_wakeups == 1


async def test_a_subscriber_that_holds_an_agent_too_long_stops_pacing() -> None:
    """Bounded: past hold_timeout the agent goes on and the slow subscriber loses messages
    (counted) until it has caught up; then it paces again."""
    bus = EventBus(queue_size=8, hold_timeout=0.05)
    subscription = bus.subscribe()  # never reads, for now
    for i in range(8):
        bus.publish(log(str(i)))
    await asyncio.wait_for(bus.wait_for_room("c1"), GUARD)  # after hold_timeout
    assert bus.hold_timeouts == 1 and not subscription.paces
    assert returns_at_once(bus.wait_for_room("c1"))  # nobody holds it back any more
    bus.publish(log("lost"))
    assert bus.dropped == 1 and subscription.lost_total == 1
    stream = aiter(subscription)
    received = [await anext(stream) for _ in range(8)]
    assert [m.agent_log.message for m in received] == [str(i) for i in range(8)]
    assert subscription.paces  # emptied its queue: it paces again
    bus.publish(log("after"))
    notice = await anext(stream)  # it is told what it lost before what comes next
    assert notice.agent_event.event_type == "events-lost"
    assert notice.agent_event.originator == "manager"
    assert json.loads(notice.agent_event.details) == {"lost": 1, "since": 8, "last": 9}
    assert notice.seq == 0
    assert (await anext(stream)).agent_log.message == "after"


async def test_a_slow_all_computations_subscriber_holds_back_no_other_computation() -> None:
    """A subscriber to every computation, still reading but slowly, with a backlog of c1's
    messages, does not hold back the agent of c2 (before, it held every agent on the host,
    each polling every millisecond)."""
    bus = EventBus(queue_size=8)
    subscription = bus.subscribe()
    for i in range(8):
        bus.publish(log(str(i), computation_id="c1"))
    await anext(aiter(subscription))  # it reads: not a stalled one
    assert returns_at_once(bus.wait_for_room("c2"))
    assert not returns_at_once(bus.wait_for_room("c1"))  # its own computation's agent waits

    # The agent of c2, through its connection, is never held while c1's backlog stays.
    manager_end, agent_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=manager_end)
    serving = asyncio.ensure_future(
        serve_agent_connection(reader, writer, "c2", lambda _: None, bus.wait_for_room)
    )
    agent_reader, agent_writer = await asyncio.open_connection(sock=agent_end)
    agent_writer.write(b"".join(frame(i + 1, log(f"m{i}")) for i in range(100)))
    agent_writer.write_eof()
    assert await asyncio.wait_for(serving, GUARD) == 100
    assert bus.hold_wakeups == 0 and bus.hold_timeouts == 0
    assert subscription.paces
    await agent_reader.read()
    agent_writer.close()


async def test_only_subscribers_of_that_computation_hold_it_back() -> None:
    bus = EventBus(queue_size=8)
    bus.subscribe("c2")
    for i in range(8):
        bus.publish(log(str(i), computation_id="c2"))
    assert returns_at_once(bus.wait_for_room("c1"))


async def test_pace_asks_for_a_wait_only_while_a_subscriber_holds_the_agent_back() -> None:
    """EventBus.pace, asked after every agent message, is a set lookup while nobody holds the
    computation back, and wait_for_room when a subscriber does."""
    bus = EventBus(queue_size=8)
    subscription = bus.subscribe()
    for i in range(4):  # exactly half full: not over
        bus.publish(log(str(i)))
        assert bus.pace("c1") is None
    bus.publish(log("4"))
    waiting = bus.pace("c1")
    assert waiting is not None and bus.pace("c2") is None
    held = asyncio.ensure_future(waiting)
    await spin()
    assert not held.done()
    stream = aiter(subscription)
    for _ in range(3):  # down to a quarter
        await anext(stream)
    await asyncio.wait_for(held, GUARD)
    assert bus.pace("c1") is None


async def test_pace_sees_a_subscriber_that_fills_up_after_nobody_held_the_agent() -> None:
    bus = EventBus(queue_size=8)
    first = bus.subscribe()
    for i in range(5):
        bus.publish(log(str(i)))
    stream = aiter(first)
    for _ in range(5):
        await anext(stream)
    assert bus.pace("c1") is None  # drained: nobody holds it back, forgotten
    second = bus.subscribe()
    for i in range(5):
        bus.publish(log(str(i)))
    for _ in range(5):  # the first one keeps up; the second one does not read
        await anext(stream)
    waiting = bus.pace("c1")
    assert waiting is not None
    held = asyncio.ensure_future(waiting)
    await spin()
    assert not held.done() and second.qsize() == 5
    held.cancel()


@pytest.mark.parametrize("pace", ["pace", "wait_for_room"])
async def test_a_burst_reaches_a_slow_subscriber_without_losses(pace: str) -> None:
    bus = EventBus(queue_size=16)
    subscription: Subscription = bus.subscribe()
    manager_end, agent_end = socket.socketpair()
    manager_end.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=manager_end)
    count = 200
    serving = asyncio.ensure_future(
        serve_agent_connection(reader, writer, "c1", bus.publish, getattr(bus, pace))
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
