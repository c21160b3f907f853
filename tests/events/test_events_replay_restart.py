"""Events replay across a daemon restart."""

from __future__ import annotations

import asyncio
import time

from cocos_manager.config.settings import ServiceSettings
from cocos_manager.events.bus import EVENTS_LOST, EventBus, manager_event


def _publish(bus: EventBus, count: int, prefix: str) -> None:
    for n in range(count):
        bus.publish(manager_event("c1", f"{prefix}-{n}", "complete"))


async def test_since_from_an_earlier_run_never_skips_silently() -> None:
    before = EventBus.from_settings(ServiceSettings())
    _publish(before, 10, "old")
    since = before.last_seq - 5  # the client saw up to here, then the daemon restarted
    while time.time() * 1_000_000 <= before.last_seq:  # a restart takes longer than this
        await asyncio.sleep(0.001)
    after = EventBus.from_settings(ServiceSettings())  # the restarted daemon
    _publish(after, 8, "new")  # e.g. re-adoption events and console lines
    subscription = after.subscribe("", since=since)
    replay = []
    async for message in subscription:
        replay.append(message.agent_event.event_type)
        if len(replay) == 9 or message.agent_event.event_type == "new-7":
            break
    told = replay[0] == EVENTS_LOST
    assert told or replay[:8] == [f"new-{n}" for n in range(8)], replay
