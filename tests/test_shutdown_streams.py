"""SIGTERM with streams open, against the real daemon: Events subscribers hear every VM's end
and then `manager-shutdown`, Logs followers never hold the VMs' stop back, and the CLI says
why its stream ended (docs/contracts.md, "Events: the stream"; docs/decisions.md, "Shutdown
and the streams")."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.events.bus import EventBus
from cocos_manager.events.messages import log_message, shutdown_notice
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.waiting import GUARD, subscribed

CLI = str(Path(sys.executable).with_name("cocos-manager-cli"))


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    yield d
    if d.process is not None and d.process.poll() is None:
        await d.terminate()


def events(messages: list[pb.ClientStreamMessage]) -> list[tuple[str, str, str]]:
    return [
        (m.agent_event.computation_id, m.agent_event.event_type, m.agent_event.status)
        for m in messages
        if m.WhichOneof("message") == "agent_event"
    ]


def details(message: pb.ClientStreamMessage) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(message.agent_event.details or b"{}")
    return doc


async def drain(call: Any) -> tuple[list[Any], grpc.StatusCode]:
    """Everything a stream delivers, and how it ended."""
    got: list[Any] = []
    try:
        while (message := await call.read()) != grpc.aio.EOF:
            got.append(message)
    except grpc.aio.AioRpcError as error:
        return got, error.code()
    return got, await call.code()


async def test_subscribers_hear_every_vm_stop_then_the_shutdown_notice(daemon: Daemon) -> None:
    for name in ("a", "b"):
        await daemon.stub.Run(run_request(name))
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ManagerServiceStub(channel)
        everything = stub.Events(pb.EventsRequest())
        only_a = stub.Events(pb.EventsRequest(computation_id="a"))
        await subscribed(everything)
        await subscribed(only_a)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        (got, code), (got_a, code_a) = await asyncio.wait_for(
            asyncio.gather(drain(everything), drain(only_a)), 4 * GUARD
        )
    assert await asyncio.to_thread(daemon.process.wait, GUARD) == 0

    seen = events(got)
    for name in ("a", "b"):
        assert (name, "vm-stop", "starting") in seen, seen
        assert (name, "vm-stop", "complete") in seen, seen
    assert code == grpc.StatusCode.OK
    # The notice opens the shutdown (before any VM's stop) and is the stream's last word.
    # A VM's console line read before the SIGTERM may come first on the stream: the notice
    # is the first event (a CI run read a log line as got[0]).
    notices = [m for m in got if m.WhichOneof("message") == "agent_event"]
    assert seen[0] == ("", "manager-shutdown", "starting"), seen
    assert details(notices[0]) == {"stops_vms": True, "computations": ["a", "b"]}
    assert seen[-1] == ("", "manager-shutdown", "complete"), seen
    assert got[-1] is notices[-1] and details(got[-1]) == {"left_running": []}
    assert got[-1].agent_event.originator == "manager" and got[-1].seq > notices[0].seq > 0

    # A subscriber of one computation hears its VM's end and the manager's notices too.
    seen_a = events(got_a)
    assert code_a == grpc.StatusCode.OK
    assert ("a", "vm-stop", "complete") in seen_a and not [e for e in seen_a if e[0] == "b"]
    assert seen_a[0][1:] == ("manager-shutdown", "starting")
    assert seen_a[-1][1:] == ("manager-shutdown", "complete")


async def test_vms_left_running_are_named_in_the_notice(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {"MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    daemon = Daemon(env=env, log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("kept"))
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            stream = stub.Events(pb.EventsRequest(computation_id="kept"))
            follow = stub.Logs(pb.LogsRequest(computation_id="kept", follow=True))
            await subscribed(stream)
            assert await asyncio.wait_for(follow.read(), GUARD) != grpc.aio.EOF  # registered
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            (got, code), (lines, log_code) = await asyncio.wait_for(
                asyncio.gather(drain(stream), drain(follow)), 4 * GUARD
            )
        assert code == grpc.StatusCode.OK
        assert [e for e in events(got) if e[1] == "vm-stop"] == []  # it runs on
        assert events(got)[-1] == ("", "manager-shutdown", "complete")
        # QEMU's console lines may come first (its keeper's file is read every 100 ms).
        (starting,) = [
            m
            for m in got
            if m.agent_event.event_type == "manager-shutdown" and m.agent_event.status == "starting"
        ]
        assert details(starting)["stops_vms"] is False
        assert details(got[-1]) == {"left_running": ["kept"]}
        # The follower is told why its stream ends though the VM runs on.
        assert log_code == grpc.StatusCode.OK
        assert "manager is shutting down" in lines[-1].message, lines
    finally:
        await daemon.terminate()
        await daemon.start()  # re-adopts the VM, and stops it
        await daemon.stub.Stop(pb.StopRequest(computation_id="kept"))
        await daemon.terminate()


async def test_an_open_logs_follow_does_not_hold_back_the_vms_stop(daemon: Daemon) -> None:
    """A follow ends with OK only when its VM ends (the console is closed at the release):
    the VM was stopped while the follower was attached, and the follower was not cut off at
    the end of the daemon's grace (CANCELLED/UNAVAILABLE), as when streams had to end
    before any VM was stopped."""
    await daemon.stub.Run(run_request("followed"))
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        follow = pb_grpc.ManagerServiceStub(channel).Logs(
            pb.LogsRequest(computation_id="followed", follow=True)
        )
        first = await asyncio.wait_for(follow.read(), GUARD)  # the follower is registered
        assert first != grpc.aio.EOF
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        lines, code = await asyncio.wait_for(drain(follow), 4 * GUARD)
    assert code == grpc.StatusCode.OK, lines
    assert await asyncio.to_thread(daemon.process.wait, GUARD) == 0


async def test_the_cli_says_the_manager_shut_down_and_exits_non_zero(daemon: Daemon) -> None:
    await daemon.stub.Run(run_request("watched"))
    # --since 0: the retained events come first, so the CLI is surely subscribed once it
    # printed the Run's last one.
    cli = await asyncio.create_subprocess_exec(
        CLI, "events", "--since", "0", "--address", daemon.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert cli.stdout is not None and cli.stderr is not None
    printed = []
    while not printed or "vm-provision" not in printed[-1] or "complete" not in printed[-1]:
        line = await asyncio.wait_for(cli.stdout.readline(), GUARD)
        assert line, "the CLI ended before printing the Run's events"
        printed.append(line.decode())
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(cli.communicate(), 4 * GUARD)
    rest, message = out.decode(), err.decode()
    assert "vm-stop" in rest and "watched" in rest, rest
    assert "manager-shutdown" in rest, rest
    assert cli.returncode == 3, (cli.returncode, message)
    assert "the manager shut down" in message, message
    assert "--since" in message, message


async def test_a_vm_still_starting_at_sigterm_is_heard_ending_too(tmp_path: Path) -> None:
    """A Run in flight (its QEMU never answers QMP) is stopped by the shutdown: its caller
    gets UNAVAILABLE, and subscribers its vm-stop before the final notice."""
    env = base_env(tmp_path) | {"FAKE_QEMU_MODE": "no-qmp", "MANAGER_QEMU_START_TIMEOUT": "60s"}
    daemon = Daemon(env=env, log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            stream = stub.Events(pb.EventsRequest())
            await subscribed(stream)
            run = asyncio.ensure_future(stub.Run(run_request("half-way")))
            while True:  # until its QEMU is spawned
                message = await asyncio.wait_for(stream.read(), GUARD)
                assert message != grpc.aio.EOF
                if message.agent_event.status == "in-progress":
                    break
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            got, code = await asyncio.wait_for(drain(stream), 4 * GUARD)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(run, GUARD)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        seen = events(got)
        assert code == grpc.StatusCode.OK
        assert ("half-way", "vm-stop", "complete") in seen, seen
        assert seen[-1] == ("", "manager-shutdown", "complete"), seen
        assert seen.index(("", "manager-shutdown", "starting")) < seen.index(
            ("half-way", "vm-stop", "complete")
        )
    finally:
        await daemon.terminate()


async def test_a_subscriber_that_was_losing_messages_still_gets_the_final_notice() -> None:
    """A full queue drops what is published, the shutdown's last word included; it is queued
    anyway at the close, after the count of what was lost."""
    bus = EventBus(queue_size=2)
    behind = bus.subscribe()
    other = bus.subscribe("another-computation")
    for i in range(5):
        bus.publish(log_message("busy", "info", f"line {i}"))
    bus.close(shutdown_notice("complete", {"left_running": []}))
    got = [message async for message in behind]
    assert [m.agent_log.message for m in got[:2]] == ["line 0", "line 1"]
    assert (got[2].agent_event.event_type, got[2].agent_event.status) == ("events-lost", "dropped")
    assert json.loads(got[2].agent_event.details) == {"lost": 3, "since": 2, "last": 5}
    assert got[3].agent_event.event_type == "manager-shutdown" and got[3].seq == bus.last_seq
    assert len(got) == 4
    # A stream of another computation had room: the notice came through once, in order.
    assert [m.agent_event.event_type async for m in other] == ["manager-shutdown"]


async def test_a_stream_opened_after_the_close_gets_the_notice_and_ends() -> None:
    bus = EventBus()
    bus.publish(log_message("c", "info", "before"))
    bus.close(shutdown_notice("complete", {"left_running": ["c"]}))
    late = [m async for m in bus.subscribe("c")]
    assert [m.agent_event.event_type for m in late] == ["manager-shutdown"]
    replayed = [m async for m in bus.subscribe("c", since=0)]  # the notice once, not twice
    assert [m.WhichOneof("message") for m in replayed] == ["agent_log", "agent_event"]
    assert replayed[-1].agent_event.event_type == "manager-shutdown"
