"""Lifecycle races: Run and Stop in one loop turn, a resumed or just-halted guest, a refused
admission, a Run cancelled as its VM became ready, an agent log out of range."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.errors import AbortedError, FailedPreconditionError
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm.lifecycle import StopReason, VmState
from cocos_manager.vm.machine import Machine
from tests.support.harness import run_request, running_manager
from tests.support.waiting import subscribed, wait_for
from tests.vm.test_guest_halt import next_event
from tests.vm.test_machine import NOTHING, make_rig


async def test_stop_in_the_same_loop_turn_as_the_run_releases_the_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Stop that runs before the start task's first step (both RPCs ready in one turn of the
    loop) cancels a coroutine that never ran: its clean-up never runs either, so nothing
    releases the VM and Stop waited forever with the id, numbers and record held."""
    async with make_rig(tmp_path, monkeypatch) as rig:
        machine = rig.admit()
        rig.start(machine)  # scheduled, not yet run
        async with asyncio.timeout(2):  # awaited here, not in a task: Stop runs first
            await machine.stop(StopReason.STOP)
        assert machine.history == [VmState.ADMITTED, VmState.STOPPING, VmState.RELEASED]
        assert rig.left_behind() == NOTHING
        assert rig.released == [machine]


async def test_run_and_stop_in_one_loop_turn_through_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run and Stop handlers ready in the same turn: the Run is aborted, the Stop answers and
    the id can run again."""
    async with running_manager(tmp_path, monkeypatch) as m:
        run = asyncio.ensure_future(m.service.run(run_request("same-turn")))
        stop = asyncio.ensure_future(m.service.stop("same-turn"))
        with pytest.raises(AbortedError):
            await asyncio.wait_for(run, 5)
        await asyncio.wait_for(stop, 5)
        assert m.service.computations() == {}
        await asyncio.wait_for(m.service.run(run_request("same-turn")), 10)
        await asyncio.wait_for(m.service.stop("same-turn"), 10)


async def test_a_resumed_guest_is_stopped_as_a_running_one_not_as_halted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After QEMU resumed a paused guest (RESUME), the halt is over: a Stop powers the guest
    down (MANAGER_QEMU_POWERDOWN_GRACE) and does not report the old halt as its reason."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "halt-after:0.2:internal-error")
    async with running_manager(
        tmp_path,
        monkeypatch,
        MANAGER_QEMU_ON_GUEST_HALT="keep",
        MANAGER_QEMU_POWERDOWN_GRACE="5s",
    ) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="resumed"))
        await subscribed(events)
        await m.stub.Run(run_request("resumed"))
        await next_event(events, "vm-paused")
        machine = m.service.computations()["resumed"]
        assert machine.process is not None and machine.process.monitor is not None
        await machine.process.monitor.execute("cont")
        await next_event(events, "vm-resumed")
        await m.stub.Stop(pb.StopRequest(computation_id="resumed"))
        status, details = await next_event(events, "vm-stop")
        while status != "complete":
            status, details = await next_event(events, "vm-stop")
        assert "qemu_status" not in details, details
        assert "reboot: Power down" in machine.process.tail(), machine.process.tail()
        events.cancel()


async def test_an_admission_refused_for_its_record_keeps_no_live_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Run refused because its record cannot be written never had a VM: no console of it
    stays live (one per refused id, never closed, was a leak; Logs served it as running)."""
    async with make_rig(tmp_path, monkeypatch) as rig:
        state = tmp_path / "state"
        state.rmdir()
        state.write_text("not a directory")
        for n in range(3):
            with pytest.raises(FailedPreconditionError):
                rig.admit(f"refused-{n}")
        assert rig.ctx.consoles.live_logs() == []
        assert rig.left_behind()["numbers"] == NOTHING["numbers"]


async def test_a_run_cancelled_as_its_vm_became_ready_leaves_no_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller goes away (deadline, cancel) in the instant the start completes: the client
    is told CANCELLED, so nobody knows the VM; it must not stay running holding the id."""
    async with running_manager(tmp_path, monkeypatch) as m:
        run = asyncio.ensure_future(m.service.run(run_request("late-cancel")))
        await asyncio.sleep(0)  # admitted, starting
        machine = m.service.computations()["late-cancel"]
        assert machine.start_task is not None
        machine.start_task.add_done_callback(lambda _: run.cancel())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)
        await asyncio.wait_for(asyncio.shield(machine.released), 10)
        assert m.service.computations() == {}


async def test_a_run_whose_start_went_on_past_its_cancellation_leaves_no_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller goes away while the start runs, and a step of the start does not pass the
    cancellation on (the readiness wait once swallowed it while QEMU exited, and the start
    went on to its next attempt): the start reaches RUNNING, the client is told CANCELLED and
    nobody knows the VM. The Run's end must stop it whatever a step does with the cancel.
    The swallowing step is made here: no step of the manager loses a cancellation today."""
    real_start = Machine.start

    async def deaf_start(machine: Machine, manifest: bytes) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.2)  # a step that keeps a cancellation to itself
        await real_start(machine, manifest)

    monkeypatch.setattr(Machine, "start", deaf_start)
    async with running_manager(tmp_path, monkeypatch) as m:
        run = asyncio.ensure_future(m.service.run(run_request("deaf")))
        await asyncio.sleep(0.05)  # admitted, in the deaf step
        machine = m.service.computations()["deaf"]
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)
        await asyncio.wait_for(asyncio.shield(machine.released), 10)
        assert VmState.RUNNING in machine.history  # it did start, past the cancellation
        assert machine.history[-1] is VmState.RELEASED
        assert machine.stop_reason is StopReason.CLIENT
        assert m.service.computations() == {}


async def test_an_agent_log_with_an_out_of_range_timestamp_is_still_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protobuf's ToNanoseconds raises on a Timestamp outside years 1-9999: the agent's
    connection was aborted on that one (already acked) message, which reached nobody."""
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("mine"))
        published = m.service.bus.published
        bad = Timestamp(seconds=1 << 40)
        m.service.publish_agent_message(
            pb.ClientStreamMessage(
                agent_log=pb.AgentLog(computation_id="mine", message="far", timestamp=bad)
            )
        )
        assert m.service.bus.published == published + 1
        assert [line.text for line in m.service.console("mine").tail()][-1] == "far"
        await m.stub.Stop(pb.StopRequest(computation_id="mine"))


async def test_a_guest_halted_right_behind_the_readiness_answer_is_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's STOP event arrives with (right behind) the query-status answer that made the VM
    ready, before the Machine watches the session: it was dropped, and the halted guest was
    a RUNNING VM for good."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "halt-on-ready:internal-error")
    async with running_manager(tmp_path, monkeypatch) as m:
        events = m.stub.Events(pb.EventsRequest(computation_id="dead-on-arrival"))
        await subscribed(events)
        await m.stub.Run(run_request("dead-on-arrival"))
        # Released by now or soon: the event says why, whichever came first.
        result, details = await next_event(events, "vm-exit")
        assert (result, details["reason"]) == ("failed", StopReason.HALTED.value)
        await wait_for(lambda: not m.service.computations(), "the halted VM's release", within=5)
