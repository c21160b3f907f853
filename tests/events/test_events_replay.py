"""Events replay through the real gRPC server: sequence numbers, `since`, events-lost, and the
bounds on subscribers (count, bytes)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
import pytest

from cocos_manager.events import bus as events_bus
from cocos_manager.events.bus import EventBus
from cocos_manager.events.messages import log_message, shutdown_notice
from cocos_manager.proto import manager_pb2 as pb
from tests.support.harness import Manager, run_request, running_manager

GUARD = 10.0
CLI = str(Path(sys.executable).with_name("cocos-manager-cli"))


async def read(call: grpc.aio.UnaryStreamCall, count: int) -> list[pb.ClientStreamMessage]:  # type: ignore[type-arg]
    out = []
    for _ in range(count):
        message = await asyncio.wait_for(call.read(), GUARD)
        assert message is not grpc.aio.EOF
        out.append(message)
    return out


async def read_until(
    call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
    event_type: str,
    status: str,
) -> list[pb.ClientStreamMessage]:
    out = []
    while True:
        message = await asyncio.wait_for(call.read(), GUARD)
        assert message is not grpc.aio.EOF
        out.append(message)
        event = message.agent_event
        if (event.event_type, event.status) == (event_type, status):
            return out


async def subscribed(m: Manager, count: int) -> None:
    """Until the server has registered `count` subscribers (a call reaches it a little later)."""
    for _ in range(int(GUARD / 0.01)):
        if m.service.bus.subscriber_count == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{m.service.bus.subscriber_count} subscribers, not {count}")


def events_of(messages: list[pb.ClientStreamMessage]) -> list[tuple[str, str]]:
    return [
        (m.agent_event.event_type, m.agent_event.status)
        for m in messages
        if m.HasField("agent_event")
    ]


def retained(m: Manager, computation_id: str = "") -> list[pb.ClientStreamMessage]:
    """What the bus retains, as a replay from 0 would give it (the test's oracle)."""
    return [
        message
        for message in m.service.bus.subscribe(computation_id, since=0)._replay
        if message.seq
    ]


async def test_since_zero_replays_the_provisioning_then_goes_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("a"))  # nobody is subscribed yet
        call = m.stub.Events(pb.EventsRequest(computation_id="a", since=0))
        replayed = await read_until(call, "vm-provision", "complete")
        assert events_of(replayed)[:3] == [
            ("vm-provision", "starting"),
            ("vm-provision", "in-progress"),
            ("vm-provision", "complete"),
        ]
        seqs = [message.seq for message in replayed]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] >= 1
        await m.stub.Stop(pb.StopRequest(computation_id="a"))
        live = await read_until(call, "vm-stop", "complete")  # then live, on the same stream
        assert ("vm-stop", "starting") in events_of(live)
        assert live[0].seq > seqs[-1]
        call.cancel()


async def test_a_reconnecting_client_misses_nothing_and_sees_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        first = m.stub.Events(pb.EventsRequest(since=0))
        await m.stub.Run(run_request("a"))
        seen = await read_until(first, "vm-provision", "complete")
        first.cancel()  # the client goes away; meanwhile more happens
        await m.stub.Run(run_request("b"))
        await m.stub.Stop(pb.StopRequest(computation_id="a"))
        again = m.stub.Events(pb.EventsRequest(since=seen[-1].seq))
        seen += await read_until(again, "vm-stop", "complete")
        again.cancel()
        # Every number once, none missing, in order: exactly what was published.
        # Consecutive from this run's first number (its start time in microseconds).
        assert [message.seq for message in seen] == list(range(seen[0].seq, seen[-1].seq + 1))
        assert [message.seq for message in retained(m)][: len(seen)] == [s.seq for s in seen]


async def test_without_since_only_live_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("a"))
        last = m.service.bus.last_seq
        call = m.stub.Events(pb.EventsRequest(computation_id="a"))
        await subscribed(m, 1)
        await m.stub.Stop(pb.StopRequest(computation_id="a"))
        messages = await read_until(call, "vm-stop", "complete")
        assert all(message.seq > last for message in messages)
        assert events_of(messages)[0] == ("vm-stop", "starting")
        call.cancel()


async def test_messages_no_longer_retained_are_reported_with_their_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        m.service.bus = EventBus(retain=3)
        for i in range(10):
            m.service.bus.publish(log_message("x", "info", f"line {i}"))
        call = m.stub.Events(pb.EventsRequest(since=2))
        notice, *rest = await read(call, 4)
        assert (notice.agent_event.event_type, notice.agent_event.originator) == (
            "events-lost",
            "manager",
        )
        assert notice.seq == 0
        assert json.loads(notice.agent_event.details) == {"lost": 5, "since": 2}
        assert [message.seq for message in rest] == [8, 9, 10]
        assert [message.agent_log.message for message in rest] == [f"line {i}" for i in (7, 8, 9)]
        call.cancel()

        # A number from an earlier run of the daemon (beyond the last one given out).
        call = m.stub.Events(pb.EventsRequest(since=500))
        notice, *rest = await read(call, 4)
        assert notice.agent_event.status == "restarted"
        assert json.loads(notice.agent_event.details) == {"since": 500, "last": 10}
        assert [message.seq for message in rest] == [8, 9, 10]
        call.cancel()


async def test_cli_events_since_prints_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("a"))
        process = await asyncio.create_subprocess_exec(
            CLI, "events", "a", "--since", "0", "--count", "3", "--address", m.address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err
        lines = out.decode().splitlines()
        first = m.runner.bus.last_seq - m.runner.bus.published + 1
        assert [line.split(" ", 1)[0] for line in lines] == [f"#{first + i}" for i in range(3)]
        assert "event manager/vm-provision: starting" in lines[0]


# -- bounds ----------------------------------------------------------------------------------


async def test_subscribers_beyond_the_cap_get_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        m.service.bus = EventBus(max_subscribers=2)
        calls = [m.stub.Events(pb.EventsRequest()) for _ in range(2)]
        await subscribed(m, 2)
        third = m.stub.Events(pb.EventsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(third.read(), GUARD)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "MANAGER_EVENTS_MAX_SUBSCRIBERS=2" in (info.value.details() or "")
        calls[0].cancel()
        await subscribed(m, 1)  # a place frees up when a subscriber leaves
        fourth = m.stub.Events(pb.EventsRequest(since=0))
        m.service.bus.publish(log_message("x", "info", "hello"))
        assert (await asyncio.wait_for(fourth.read(), GUARD)).agent_log.message == "hello"
        for call in (calls[1], fourth):
            call.cancel()


def test_a_subscriber_queue_is_bounded_in_bytes() -> None:
    """1 MiB frames times 4096 messages would be 4 GiB: the byte bound stops it first."""
    bus = EventBus(queue_size=4096, queue_bytes=3 * 1024 * 1024)
    subscription = bus.subscribe()
    big = "x" * (1024 * 1024 - 64)
    for _ in range(10):
        bus.publish(log_message("c", "info", big))
    assert subscription.qsize() == 3
    assert subscription.queued_bytes <= 3 * 1024 * 1024
    assert bus.dropped == 7 and subscription.lost_total == 7


def test_one_message_larger_than_the_byte_bound_still_gets_through() -> None:
    bus = EventBus(queue_bytes=100)
    subscription = bus.subscribe()
    bus.publish(log_message("c", "info", "y" * 1000))
    assert subscription.qsize() == 1 and bus.dropped == 0


def test_retention_is_bounded_in_count_and_bytes() -> None:
    bus = EventBus(retain=5, retain_bytes=1 << 30)
    for i in range(20):
        bus.publish(log_message("c", "info", str(i)))
    assert [m.seq for m in bus.subscribe(since=0)._replay if m.seq] == [16, 17, 18, 19, 20]
    bus = EventBus(retain=1000, retain_bytes=3000)
    for _ in range(20):
        bus.publish(log_message("c", "info", "z" * 1000))
    assert len([m for m in bus.subscribe(since=0)._replay if m.seq]) == 2


def test_a_filtered_replay_is_told_of_lost_manager_wide_messages() -> None:
    """A stream of one computation gets the manager-wide messages too (the shutdown
    notices): one of them evicted is a loss for it, though none of its own went."""
    bus = EventBus(retain=3)
    bus.publish(log_message("quiet", "info", "seen"))  # seq 1
    bus.publish(shutdown_notice("started", {"vms": 1}))  # seq 2, manager-wide
    for i in range(3):
        bus.publish(log_message("chatty", "info", str(i)))  # seq 3-5; 1-2 evicted
    replay = list(bus.subscribe("quiet", since=1)._replay)
    assert [m.agent_event.event_type for m in replay] == ["events-lost"]
    assert json.loads(replay[0].agent_event.details) == {"lost": 1, "since": 1}
    assert list(bus.subscribe("quiet", since=2)._replay) == []  # it had seen the notice


def test_a_stream_of_one_computation_is_not_told_of_others_losses_past_the_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More computations evicted than are remembered: one whose own last eviction is still
    known, and came before `since`, lost nothing (the manager-wide messages, never evicted
    here, are no loss either). A first version of the manager-wide check said otherwise."""
    monkeypatch.setattr(events_bus, "_REMEMBERED_EVICTIONS", 5)
    bus = EventBus(retain=3)
    for i in range(10):
        bus.publish(log_message(f"other{i}", "info", "x"))  # seq 1-10
    bus.publish(log_message("mine", "info", "m1"))  # seq 11, seen by the client
    for i in range(6):
        bus.publish(log_message(f"more{i}", "info", "y"))  # 12-17; 11-14 evicted
    assert bus._evictions.forgot_upto > 0
    assert list(bus.subscribe("mine", since=11)._replay) == []
    lost = list(bus.subscribe("mine", since=10)._replay)
    assert [m.agent_event.event_type for m in lost] == ["events-lost"]


def test_a_computation_never_evicted_is_told_of_no_loss_after_what_was_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Evictions forgotten (more computations than remembered): a computation that has all
    its messages retained, replayed from before them, was told of a loss for ever after."""
    monkeypatch.setattr(events_bus, "_REMEMBERED_EVICTIONS", 5)
    bus = EventBus(retain=3)
    for i in range(6):
        bus.publish(log_message(f"other{i}", "info", "x"))  # seq 1-6; 1-3 evicted
    for i in range(3):
        bus.publish(log_message("fresh", "info", f"f{i}"))  # seq 7-9; 4-6 evicted
    assert bus._evictions.forgot_upto == 1  # other0's, forgotten for other5's
    replay = bus.subscribe("fresh", since=5)._replay  # seq 6 (other5) is no loss of its
    assert [m.agent_log.message for m in replay] == ["f0", "f1", "f2"]


def test_a_filtered_replay_is_told_only_of_its_own_losses() -> None:
    """Evictions of other computations' messages are no loss for a stream of one."""
    bus = EventBus(retain=3)
    bus.publish(log_message("quiet", "info", "kept?"))  # seq 1
    for i in range(5):
        bus.publish(log_message("chatty", "info", str(i)))  # seq 2-6; 1-3 evicted
    quiet = list(bus.subscribe("quiet", since=1)._replay)
    assert quiet == []  # its one message (seq 1) was seen: nothing of it lost
    lost = bus.subscribe("quiet", since=0)._replay
    assert [m.agent_event.event_type for m in lost] == ["events-lost"]
    chatty = list(bus.subscribe("chatty", since=1)._replay)
    assert chatty[0].agent_event.event_type == "events-lost"
    assert [m.agent_log.message for m in chatty[1:]] == ["2", "3", "4"]
    assert not bus.subscribe("other", since=0)._replay  # never had a message
    everything = bus.subscribe(since=1)._replay
    assert json.loads(everything[0].agent_event.details) == {"lost": 2, "since": 1}
