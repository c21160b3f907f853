"""The verbs an operator reaches for beyond Run and Stop, against the real daemon with the
stand-in QEMU: a forced Stop, Pause and Resume (QMP stop / cont), Get (everything about one
VM, also after it ended), and a Run's own size within the operator's ceilings."""

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
from tests.support.harness import base_env, run_request, running_manager
from tests.support.processes import processes_mentioning
from tests.support.records import newest_record_path
from tests.support.waiting import GUARD, subscribed, wait_for

# A guest that ignores the power button, given a grace far beyond any bounded wait below:
# a Stop that waited for it could not finish within the test's bound.
LONG_GRACE = {"MANAGER_QEMU_POWERDOWN_GRACE": "10m"}
BOUND = 60.0  # well under LONG_GRACE


async def manager_event(
    events: grpc.aio.UnaryStreamCall[pb.EventsRequest, pb.ClientStreamMessage], event_type: str
) -> tuple[str, dict[str, Any]]:
    """The next manager event of this type: (status, details)."""
    while True:
        message = await asyncio.wait_for(events.read(), GUARD)
        assert message is not grpc.aio.EOF, "the stream ended"
        event = message.agent_event
        if message.HasField("agent_event") and event.event_type == event_type:
            return event.status, json.loads(event.details) if event.details else {}


# -- forced Stop --------------------------------------------------------------------------


async def test_a_forced_stop_does_not_wait_for_the_power_down_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-powerdown")
    async with running_manager(tmp_path, monkeypatch, **LONG_GRACE) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="f"))
        await subscribed(events)
        await m.stub.Run(run_request("f"))
        await asyncio.wait_for(m.stub.Stop(pb.StopRequest(computation_id="f", force=True)), BOUND)
        status, details = await manager_event(events, "vm-stop")
        assert (status, details) == ("starting", {"reason": "stop", "force": True})
        assert (await manager_event(events, "vm-stop"))[0] == "complete"
        assert m.service.computations() == {}
        assert processes_mentioning(str(tmp_path / "vms")) == []
        events.cancel()


async def test_a_forced_stop_cuts_short_a_stop_waiting_on_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-powerdown")
    async with running_manager(tmp_path, monkeypatch, **LONG_GRACE) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="g"))
        await subscribed(events)
        await m.stub.Run(run_request("g"))
        polite = asyncio.ensure_future(m.stub.Stop(pb.StopRequest(computation_id="g")))
        status, details = await manager_event(events, "vm-stop")
        # The grace is announced (the CLI tells the operator how long it waits).
        assert (status, details) == ("starting", {"reason": "stop", "powerdown_grace": "10m0s"})
        assert not polite.done()
        await asyncio.wait_for(m.stub.Stop(pb.StopRequest(computation_id="g", force=True)), BOUND)
        await asyncio.wait_for(polite, BOUND)  # the first Stop ends with it
        assert (await manager_event(events, "vm-stop"))[0] == "complete"
        assert processes_mentioning(str(tmp_path / "vms")) == []
        events.cancel()


async def test_without_a_grace_no_wait_is_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="n"))
        await subscribed(events)
        await m.stub.Run(run_request("n"))
        await m.stub.Stop(pb.StopRequest(computation_id="n"))
        assert await manager_event(events, "vm-stop") == ("starting", {"reason": "stop"})
        events.cancel()


# -- Pause / Resume -----------------------------------------------------------------------


async def test_pause_and_resume_freeze_and_thaw_the_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="p"))
        await subscribed(events)
        await m.stub.Run(run_request("p"))
        machine = m.service.computations()["p"]
        assert machine.process is not None and machine.process.monitor is not None
        await m.stub.Pause(pb.PauseRequest(computation_id="p"))
        status, details = await manager_event(events, "vm-paused")
        assert status == "complete" and details["reason"] == "pause"
        assert machine.state is VmState.PAUSED
        assert await machine.process.monitor.query_status() == "paused"  # QEMU's own word
        (info,) = (await m.stub.List(pb.ListRequest())).computations
        assert info.state == "paused"
        got = await m.stub.Get(pb.GetRequest(computation_id="p"))
        assert (got.computation.state, got.paused_by) == ("paused", "operator")
        await m.stub.Pause(pb.PauseRequest(computation_id="p"))  # again: nothing to do
        await m.stub.Resume(pb.ResumeRequest(computation_id="p"))
        assert (await manager_event(events, "vm-resumed"))[0] == "complete"
        assert machine.state is VmState.RUNNING
        assert await machine.process.monitor.query_status() == "running"
        await m.stub.Resume(pb.ResumeRequest(computation_id="p"))  # again: nothing to do
        assert machine.history.count(VmState.PAUSED) == 1  # the repeats published nothing
        assert (await m.stub.Get(pb.GetRequest(computation_id="p"))).paused_by == ""
        events.cancel()


async def test_pause_and_resume_refuse_what_they_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        for call, request in (
            (m.stub.Pause, pb.PauseRequest(computation_id="nobody")),
            (m.stub.Resume, pb.ResumeRequest(computation_id="nobody")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(request)  # type: ignore[operator]
            assert raised.value.code() is grpc.StatusCode.NOT_FOUND
            assert "'nobody'" in (raised.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await m.stub.Pause(pb.PauseRequest())
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_starting_vm_cannot_be_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "no-qmp")  # never ready: stays starting
    async with running_manager(tmp_path, monkeypatch) as m:
        run = asyncio.ensure_future(m.stub.Run(run_request("s")))
        await wait_for(
            lambda: (
                (c := m.service.computations().get("s")) is not None and c.state is VmState.STARTING
            ),
            "the VM to be starting",
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await m.stub.Pause(pb.PauseRequest(computation_id="s"))
        assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "is starting" in (raised.value.details() or "")
        await m.stub.Stop(pb.StopRequest(computation_id="s"))
        with pytest.raises(grpc.aio.AioRpcError):
            await run


async def test_a_paused_vm_is_stopped_without_waiting_for_a_power_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused guest cannot see the power button; it is not resumed to press it."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-powerdown")
    async with running_manager(tmp_path, monkeypatch, **LONG_GRACE) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="ps"))
        await subscribed(events)
        await m.stub.Run(run_request("ps"))
        await m.stub.Pause(pb.PauseRequest(computation_id="ps"))
        await asyncio.wait_for(m.stub.Stop(pb.StopRequest(computation_id="ps")), BOUND)
        assert await manager_event(events, "vm-stop") == ("starting", {"reason": "stop"})
        assert processes_mentioning(str(tmp_path / "vms")) == []
        events.cancel()


async def test_a_paused_vm_stays_paused_across_a_restart(tmp_path: Path) -> None:
    daemon = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("kept"))
        await daemon.stub.Pause(pb.PauseRequest(computation_id="kept"))
        await daemon.kill()
        await daemon.start()
        (info,) = (await daemon.stub.List(pb.ListRequest())).computations
        assert (info.state, info.adopted) == ("paused", True)
        got = await daemon.stub.Get(pb.GetRequest(computation_id="kept"))
        assert got.paused_by == "operator"  # not mistaken for a guest QEMU halted
        events = daemon.stub.Events(pb.EventsRequest(computation_id="kept", since=0))
        status, details = await manager_event(events, "vm-paused")
        assert status == "complete" and details["readopted"] is True
        await daemon.stub.Resume(pb.ResumeRequest(computation_id="kept"))
        assert (await manager_event(events, "vm-resumed"))[0] == "complete"
        (info,) = (await daemon.stub.List(pb.ListRequest())).computations
        assert info.state == "running"
        events.cancel()
        await daemon.stub.Stop(pb.StopRequest(computation_id="kept"))
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()


# -- Get ----------------------------------------------------------------------------------


async def test_get_says_what_list_says_and_how_the_vm_was_launched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        request = run_request("info")
        request.ttl = "90m"
        await m.stub.Run(request)
        (listed,) = (await m.stub.List(pb.ListRequest())).computations
        got = await m.stub.Get(pb.GetRequest(computation_id="info"))
        assert got.computation == listed
        machine = m.service.computations()["info"]
        assert machine.process is not None
        assert list(got.qemu_argv) == machine.process.argv
        assert {"kernel", "rootfs", "qmp"} <= set(got.files)
        assert all(str(tmp_path / "vms") in path for path in got.files.values())
        assert got.settings["MANAGER_QEMU_SMP_COUNT"] == "4"
        assert got.settings["MANAGER_QEMU_HOST_FWD_AGENT"] == listed.agent_port  # its own
        assert got.settings["MANAGER_QEMU_STOP_TIMEOUT"] == "5s"
        assert (got.vcpus, got.memory_mib) == (4, 2048)
        assert (got.confidential_mode, dict(got.binding)) == ("none", {})
        assert got.ttl == "1h30m0s"
        assert not got.HasField("last_exit")
        await m.stub.Stop(pb.StopRequest(computation_id="info"))
        ended = await m.stub.Get(pb.GetRequest(computation_id="info"))
        assert (ended.computation.state, ended.computation.pid) == ("ended", 0)
        assert got.computation.HasField("expires_at")
        assert not ended.computation.HasField("expires_at")
        assert ended.last_exit.reason == "stop"
        assert (ended.last_exit.event_type, ended.last_exit.status) == ("vm-stop", "complete")
        assert ended.last_exit.HasField("ended_at")
        assert dict(ended.files) == {}  # removed with the VM
        assert list(ended.qemu_argv) == list(got.qemu_argv)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await m.stub.Get(pb.GetRequest(computation_id="never"))
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND


async def test_get_tells_how_a_vm_that_exited_on_its_own_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "exit-after:0.3:3")
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("dies"))
        await wait_for(lambda: not m.service.computations(), "the VM's own exit")
        got = await m.stub.Get(pb.GetRequest(computation_id="dies"))
        e = got.last_exit
        assert (e.reason, e.event_type, e.status) == ("exit", "vm-exit", "failed")
        assert "3" in e.exit


async def test_get_of_an_ended_vm_follows_the_console_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_LOG_RETAINED_VMS="1") as m:
        for name in ("first", "second"):
            await m.stub.Run(run_request(name))
            await m.stub.Stop(pb.StopRequest(computation_id=name))
        assert (await m.stub.Get(pb.GetRequest(computation_id="second"))).last_exit.reason
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await m.stub.Get(pb.GetRequest(computation_id="first"))
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND


# -- a Run's own size ---------------------------------------------------------------------


def option_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


async def test_a_run_may_ask_for_its_size_within_the_ceilings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ceilings = {"MANAGER_QEMU_MAX_SMP": "8", "MANAGER_QEMU_MAX_MEMORY_PER_VM": "4G"}
    async with running_manager(tmp_path, monkeypatch, **ceilings) as m:
        request = run_request("sized")
        request.vcpus, request.memory_mib = 8, 4096
        await m.stub.Run(request)
        got = await m.stub.Get(pb.GetRequest(computation_id="sized"))
        argv = list(got.qemu_argv)
        assert option_after(argv, "-smp") == "8,maxcpus=64"
        assert option_after(argv, "-m") == "4096M,slots=5,maxmem=30G"
        assert (got.vcpus, got.memory_mib) == (8, 4096)
        assert got.settings["MANAGER_QEMU_SMP_COUNT"] == "8"
        await m.stub.Run(run_request("default"))  # no size: the settings', as before
        argv = list((await m.stub.Get(pb.GetRequest(computation_id="default"))).qemu_argv)
        assert option_after(argv, "-smp") == "4,maxcpus=64"
        assert option_after(argv, "-m") == "2048M,slots=5,maxmem=30G"


@pytest.mark.parametrize(
    ("env", "vcpus", "memory", "named"),
    [
        ({}, 5, 0, "MANAGER_QEMU_MAX_SMP (unset: MANAGER_QEMU_SMP_COUNT)"),
        ({}, 0, 4096, "MANAGER_QEMU_MAX_MEMORY_PER_VM (unset: MANAGER_QEMU_MEMORY_SIZE)"),
        ({"MANAGER_QEMU_MAX_SMP": "8"}, 9, 0, "of 8 set by MANAGER_QEMU_MAX_SMP"),
        ({"MANAGER_QEMU_MAX_SMP": "128"}, 65, 0, "of 64 set by MANAGER_QEMU_SMP_MAXCPUS"),
        ({"MANAGER_QEMU_MAX_MEMORY_PER_VM": "3G"}, 0, 3073, "MANAGER_QEMU_MAX_MEMORY_PER_VM"),
        ({"MANAGER_QEMU_MAX_MEMORY_PER_VM": "64G"}, 0, 40000, "MANAGER_QEMU_MAX_MEMORY"),
    ],
)
async def test_a_size_over_a_ceiling_is_refused_naming_it_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    vcpus: int,
    memory: int,
    named: str,
) -> None:
    async with running_manager(tmp_path, monkeypatch, **env) as m:
        request = run_request("big")
        request.vcpus, request.memory_mib = vcpus, memory
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await m.stub.Run(request)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert named in (raised.value.details() or "")
        assert m.service.computations() == {}
        assert list((tmp_path / "state").glob("*.json")) == []
        assert processes_mentioning(str(tmp_path / "vms")) == []


async def test_the_size_is_kept_across_a_restart(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "MANAGER_QEMU_MAX_SMP": "2"}
    daemon = Daemon(env=env, log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        request = run_request("small")
        request.vcpus, request.memory_mib = 2, 512
        await daemon.stub.Run(request)
        await daemon.kill()
        await daemon.start()
        got = await daemon.stub.Get(pb.GetRequest(computation_id="small"))
        assert got.computation.adopted
        assert (got.vcpus, got.memory_mib) == (2, 512)
        assert got.settings["MANAGER_QEMU_MEMORY_SIZE"] == "512M"
        await daemon.stub.Stop(pb.StopRequest(computation_id="small"))
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()


async def test_a_pause_whose_record_was_not_written_is_found_paused_after_a_restart(
    tmp_path: Path,
) -> None:
    """The daemon SIGKILLed after QEMU took the QMP `stop` but before the record said so: the
    record says running, QEMU says paused. Re-adopted paused (not killed as a wedged VM)."""
    daemon = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("window"))
        await daemon.stub.Pause(pb.PauseRequest(computation_id="window"))
        await daemon.kill()
        path = newest_record_path(tmp_path / "state")
        record = json.loads(path.read_text())
        assert (record["state"], record["operator_paused"]) == ("paused", True)
        record.update(state="running", operator_paused=False)  # as it was before the pause
        path.write_text(json.dumps(record))
        await daemon.start()
        (info,) = (await daemon.stub.List(pb.ListRequest())).computations
        assert (info.computation_id, info.state, info.adopted) == ("window", "paused", True)
        assert (await daemon.stub.Get(pb.GetRequest(computation_id="window"))).paused_by == (
            "operator"
        )
        await daemon.stub.Resume(pb.ResumeRequest(computation_id="window"))
        (info,) = (await daemon.stub.List(pb.ListRequest())).computations
        assert info.state == "running"
        await daemon.stub.Stop(pb.StopRequest(computation_id="window"))
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()


async def test_a_resume_whose_record_was_not_written_is_found_running_after_a_restart(
    tmp_path: Path,
) -> None:
    """The other window: QEMU took the `cont`, the record still says paused by the operator."""
    daemon = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("thawed"))
        await daemon.kill()
        path = newest_record_path(tmp_path / "state")
        record = json.loads(path.read_text())
        record.update(state="paused", operator_paused=True)  # as it was before the resume
        path.write_text(json.dumps(record))
        await daemon.start()
        (info,) = (await daemon.stub.List(pb.ListRequest())).computations
        assert (info.computation_id, info.state, info.adopted) == ("thawed", "running", True)
        await daemon.stub.Stop(pb.StopRequest(computation_id="thawed"))
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()


async def test_a_stop_during_a_pause_does_not_wait_for_a_power_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Stop that lands while a Pause's QMP stop is in flight: the guest is being frozen, so
    the long grace is not waited (the Pause then fails: the VM is being stopped)."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "slow-stop:1")  # under the 2 s power-button call
    async with running_manager(tmp_path, monkeypatch, **LONG_GRACE) as m:
        await m.stub.Run(run_request("race"))
        machine = m.service.computations()["race"]
        pause = asyncio.ensure_future(m.stub.Pause(pb.PauseRequest(computation_id="race")))
        await wait_for(lambda: machine.pausing, "the Pause's QMP stop in flight")
        await asyncio.wait_for(m.stub.Stop(pb.StopRequest(computation_id="race")), BOUND)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await pause
        assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert processes_mentioning(str(tmp_path / "vms")) == []
