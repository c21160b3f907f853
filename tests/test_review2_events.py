"""Events replay with MANAGER_EVENTS_RETAIN=0 (found in review): nothing is retained, so a
replay for one computation whose messages were published must announce the loss, as a replay
of every computation does."""

from __future__ import annotations

from cocos_manager.events import EVENTS_LOST, EventBus, manager_event


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
