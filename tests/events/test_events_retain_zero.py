"""Events replay with MANAGER_EVENTS_RETAIN=0 (found in review): nothing is retained, so a
replay for one computation whose messages were published must announce the loss, as a replay
of every computation does."""

from __future__ import annotations

import asyncio
import time

from cocos_manager.config.settings import ServiceSettings
from cocos_manager.events.bus import EVENTS_LOST, EventBus, log_message, manager_event


async def test_replay_without_retention_announces_the_loss_for_one_computation() -> None:
    bus = EventBus(retain=0)
    bus.publish(manager_event("c1", "vm-provision", "starting", {}))
    for computation_id in ("", "c1"):
        subscription = bus.subscribe(computation_id, since=0)
        replay = [m async for m in _replayed(subscription)]
        assert [(m.agent_event.event_type, m.agent_event.status) for m in replay] == [
            (EVENTS_LOST, "replay")
        ], computation_id
        subscription.close()


async def _replayed(subscription):  # type: ignore[no-untyped-def]
    """The replayed part only: the stream is closed, so iteration ends after it."""
    subscription.close()
    async for message in subscription:
        yield message


async def test_a_number_from_before_a_restart_is_told_even_after_the_new_run_passed_it() -> None:
    before = EventBus.from_settings(ServiceSettings())  # an earlier run; the client saw 50
    for i in range(50):
        before.publish(log_message("c1", "info", f"old {i}"))
    last_seen = before.last_seq
    while time.time() * 1_000_000 <= before.last_seq:  # a restart takes longer than this
        await asyncio.sleep(0.001)
    after = EventBus.from_settings(ServiceSettings())  # restarted: re-adoptions, console...
    for i in range(60):
        after.publish(log_message("c1", "info", f"new {i}"))
    subscription = after.subscribe("", since=last_seen)
    replay = [m async for m in _replayed(subscription)]
    # Either told of the restart, or given the new run's messages from its start.
    told = replay and replay[0].agent_event.status == "restarted"
    first = after.last_seq - 59
    assert told or replay[0].seq == first, [m.seq for m in replay[:3]]
