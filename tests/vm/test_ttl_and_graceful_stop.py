"""Acceptance tests of the TTL and the graceful stop through the daemon: the Machine arms the
TTL (ttl.arm) and powers the guest down through its QMP session before SIGTERM
(docs/architecture.md, "How a VM ends")."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.support.daemon_process import Daemon
from tests.support.harness import Manager, base_env, run_request, running_manager
from tests.support.processes import processes_mentioning
from tests.support.waiting import subscribed

WAIT = 30.0


async def manager_event(
    events: AsyncIterator[pb.ClientStreamMessage], event_type: str, status: str
) -> dict[str, object]:
    async for message in events:
        event = message.agent_event
        if event.event_type == event_type and event.status == status:
            return json.loads(event.details) if event.details else {}
    raise AssertionError(f"the stream ended before {event_type} {status}")


async def listed(stub: pb_grpc.ManagerServiceStub) -> dict[str, pb.ComputationInfo]:
    response = await stub.List(pb.ListRequest(), timeout=5)
    return {c.computation_id: c for c in response.computations}


async def test_a_ttl_stops_the_vm_as_stop_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="short"))
        await subscribed(events)
        request = run_request("short")
        request.ttl = "1s"
        await m.stub.Run(request, timeout=WAIT)
        answered = time.time()
        info = (await listed(m.stub))["short"]
        assert info.HasField("expires_at")
        deadline = info.expires_at.ToMilliseconds() / 1000
        assert abs(deadline - (answered + 1)) < 0.5
        details = await asyncio.wait_for(manager_event(events, "vm-stop", "starting"), WAIT)
        assert details["reason"] == "ttl"
        assert abs(details["expires_at"] - deadline) < 0.01  # the deadline that ran out
        await asyncio.wait_for(manager_event(events, "vm-stop", "complete"), WAIT)
        events.cancel()
        assert time.time() >= deadline - 0.01  # not before its deadline (ms precision)
        assert await listed(m.stub) == {}
        assert processes_mentioning(str(tmp_path)) == []


async def test_the_default_ttl_applies_to_runs_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_DEFAULT_TTL="1h") as m:
        await m.stub.Run(run_request("default"), timeout=WAIT)
        expires = (await listed(m.stub))["default"].expires_at.ToMilliseconds() / 1000
        assert abs(expires - (time.time() + 3600)) < 5


async def test_a_ttl_survives_a_sigkill_of_the_daemon(tmp_path: Path) -> None:
    daemon = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        request = run_request("survivor")
        request.ttl = "10s"  # long enough for a restart on a loaded host
        await daemon.stub.Run(request, timeout=WAIT)
        before = (await listed(daemon.stub))["survivor"]
        await daemon.kill()
        await daemon.start()
        after = (await listed(daemon.stub))["survivor"]
        assert after.adopted and after.pid == before.pid
        assert after.expires_at == before.expires_at  # the deadline came back from the record
        events = daemon.stub.Events(pb.EventsRequest(computation_id="survivor", since=0))
        details = await asyncio.wait_for(manager_event(events, "vm-stop", "starting"), WAIT)
        assert details["reason"] == "ttl"
        await asyncio.wait_for(manager_event(events, "vm-stop", "complete"), WAIT)
        events.cancel()
        assert time.time() >= before.expires_at.ToMilliseconds() / 1000
        assert await listed(daemon.stub) == {}
        assert processes_mentioning(str(tmp_path / "vms")) == []
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()


async def console(m: Manager, computation_id: str) -> list[str]:
    request = pb.LogsRequest(computation_id=computation_id)
    return [line.message async for line in m.stub.Logs(request, timeout=5)]


async def test_stop_presses_the_power_button_first_when_a_grace_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_POWERDOWN_GRACE="10s") as m:
        await m.stub.Run(run_request("gentle"), timeout=WAIT)
        began = time.monotonic()
        await m.stub.Stop(pb.StopRequest(computation_id="gentle"), timeout=WAIT)
        assert time.monotonic() - began < 10
        lines = await console(m, "gentle")
        assert "reboot: Power down" in lines  # the stand-in's answer to the power button
        assert not any("terminating on signal" in line for line in lines)


async def test_a_guest_ignoring_the_button_gets_sigterm_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-powerdown")
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_POWERDOWN_GRACE="1s") as m:
        await m.stub.Run(run_request("stubborn"), timeout=WAIT)
        began = time.monotonic()
        await m.stub.Stop(pb.StopRequest(computation_id="stubborn"), timeout=WAIT)
        assert time.monotonic() - began >= 1.0
        assert any("terminating on signal 15" in line for line in await console(m, "stubborn"))


async def test_without_a_grace_stop_is_the_originals_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("plain"), timeout=WAIT)
        await m.stub.Stop(pb.StopRequest(computation_id="plain"), timeout=WAIT)
        lines = await console(m, "plain")
        assert "reboot: Power down" not in lines
        assert any("terminating on signal 15" in line for line in lines)
