"""A guest that QEMU stopped is not "running": QEMU's own events on the VM's QMP session
(STOP with a halted run state, GUEST_PANICKED) become state and events, as libvirt does.
The stand-in QEMU halts the guest as KVM's emulation failure or a panic does
(FAKE_QEMU_MODE=halt-after:S:STATUS): the process stays alive, the guest does not run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm.lifecycle import VmState
from tests.support.daemon_process import Daemon
from tests.support.harness import Manager, base_env, run_request, running_manager
from tests.support.processes import processes_mentioning
from tests.support.waiting import GUARD, subscribed, wait_for


async def next_event(
    events: grpc.aio.UnaryStreamCall[pb.EventsRequest, pb.ClientStreamMessage], event_type: str
) -> tuple[str, dict[str, Any]]:
    """The next manager event of this type: (status, details)."""
    while True:
        message = await asyncio.wait_for(events.read(), GUARD)
        assert message is not grpc.aio.EOF, "the stream ended"
        event = message.agent_event
        if message.HasField("agent_event") and event.event_type == event_type:
            return event.status, json.loads(event.details) if event.details else {}


async def listed_state(m: Manager, computation_id: str) -> str | None:
    reply = await m.stub.List(pb.ListRequest())
    return next((c.state for c in reply.computations if c.computation_id == computation_id), None)


@pytest.mark.parametrize("status", ["internal-error", "guest-panicked"])
async def test_a_halted_guest_is_stopped_with_qemus_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: str
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", f"halt-after:0.2:{status}")
    async with running_manager(tmp_path, monkeypatch) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="halts"))
        await subscribed(events)
        await m.stub.Run(run_request("halts"))
        # It ran before it halted (told by its events: a List after the Run's answer raced
        # the halt, 0.2 s after QMP answered, on a loaded CI host).
        provision = [(await next_event(events, "vm-provision"))[0] for _ in range(3)]
        assert provision == ["starting", "in-progress", "complete"]
        result, details = await next_event(events, "vm-exit")
        assert result == "failed"
        assert details["reason"] == "halted" and details["qemu_status"] == status
        await wait_for(lambda: not m.service.computations(), "the halted VM's release")
        assert await listed_state(m, "halts") is None
        assert processes_mentioning(str(tmp_path / "vms")) == []  # QEMU was stopped
        await m.stub.Run(run_request("halts"))  # its id and numbers are free again
        events.cancel()


async def test_with_keep_a_halted_guest_is_paused_for_inspection_and_can_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "halt-after:0.2:internal-error")
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_ON_GUEST_HALT="keep") as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="kept"))
        await subscribed(events)
        await m.stub.Run(run_request("kept"))
        result, details = await next_event(events, "vm-paused")
        assert result == "failed" and details["qemu_status"] == "internal-error"
        machine = m.service.computations()["kept"]
        assert machine.state is VmState.PAUSED
        assert await listed_state(m, "kept") == "paused"
        assert machine.process is not None and not machine.process.exited.done()  # kept
        assert machine.process.monitor is not None
        await machine.process.monitor.execute("cont")  # an operator resumes it
        assert (await next_event(events, "vm-resumed"))[0] == "complete"
        assert machine.state is VmState.RUNNING
        await m.stub.Stop(pb.StopRequest(computation_id="kept"))
        assert (await next_event(events, "vm-stop"))[0] == "starting"
        assert m.service.computations() == {}
        events.cancel()


async def test_a_vm_kept_paused_is_kept_across_a_restart(tmp_path: Path) -> None:
    env = {
        **base_env(tmp_path),
        "FAKE_QEMU_MODE": "halt-after:0.2:internal-error",
        "MANAGER_QEMU_ON_GUEST_HALT": "keep",
    }
    daemon = Daemon(env=env, log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("inspect"))
        events = daemon.stub.Events(pb.EventsRequest(computation_id="inspect", since=0))
        assert (await next_event(events, "vm-paused"))[0] == "failed"
        events.cancel()
        await daemon.kill()
        await daemon.start()
        reply = await daemon.stub.List(pb.ListRequest())
        (info,) = reply.computations
        assert (info.computation_id, info.state, info.adopted) == ("inspect", "paused", True)
        await daemon.stub.Stop(pb.StopRequest(computation_id="inspect"))
        assert (await daemon.stub.List(pb.ListRequest())).computations == []
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()
