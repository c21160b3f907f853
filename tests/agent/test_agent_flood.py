"""A guest flooding its agent connection with small frames does not hold the event loop: the
connection gives the loop a turn every YIELD_EVERY messages it publishes, so RPCs, QMP events,
timers and other guests keep being served while it is read. Proven by order (how many
messages were published between two turns of another task), not by the clock."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from cocos_manager.agent.protocol import YIELD_EVERY, serve_agent_connection
from cocos_manager.proto.manager_pb2 import ClientStreamMessage
from tests.agent.test_agent_protocol import GUARD, frame, log_message

MESSAGES = 20_000


def flood(agent: socket.socket, framed: bool) -> None:
    """The guest: every message written as fast as the socket takes it (framed, or unframed as
    the first agents wrote them), acks read and ignored."""

    def drain_acks() -> None:
        while agent.recv(65536):
            pass

    reader = threading.Thread(target=drain_acks)
    reader.start()
    messages = (log_message(str(i)) for i in range(1, MESSAGES + 1))
    agent.sendall(
        b"".join(
            frame(i, m) if framed else m.SerializeToString() for i, m in enumerate(messages, 1)
        )
    )
    agent.shutdown(socket.SHUT_WR)
    reader.join()
    agent.close()


@pytest.mark.parametrize("framed", [True, False], ids=["framed", "unframed"])
async def test_a_flood_of_small_frames_gives_the_loop_a_turn_every_few_hundred_messages(
    framed: bool,
) -> None:
    manager_end, agent_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=manager_end)
    published: list[ClientStreamMessage] = []
    seen_at_turns: list[int] = []

    async def other_task() -> None:  # anything else the daemon runs meanwhile
        while len(published) < MESSAGES:
            seen_at_turns.append(len(published))
            await asyncio.sleep(0)

    guest = threading.Thread(target=flood, args=(agent_end, framed))
    guest.start()
    try:
        other = asyncio.ensure_future(other_task())
        count = await asyncio.wait_for(
            serve_agent_connection(reader, writer, "flooded", published.append), GUARD
        )
        await asyncio.wait_for(other, GUARD)
    finally:
        await asyncio.to_thread(guest.join)
    assert count == MESSAGES == len(published)
    gaps = [b - a for a, b in zip(seen_at_turns, [*seen_at_turns[1:], MESSAGES], strict=True)]
    assert max(gaps) <= YIELD_EVERY
