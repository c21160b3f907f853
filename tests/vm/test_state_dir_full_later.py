"""A MANAGER_STATE_DIR that fills up after admission (a real tmpfs, filled to its last byte).

A VM is running only if its record says so: a restart kills a QEMU whose record still says
`starting` (its Run never answered). So a Run whose `running` record cannot be written fails
like any other start (RESOURCE_EXHAUSTED, nothing left) instead of answering OK for a VM the
next restart would kill. And a restart that cannot write the new version of a running VM's
record keeps the VM: the version it adopted from is still on the disk and still names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm.lifecycle import VmState
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request, running_manager
from tests.support.processes import kill_and_reap, processes_mentioning
from tests.support.records import newest_records
from tests.support.waiting import wait_for
from tests.test_faults import assert_nothing_left, run_error, tmpfs
from tests.vm.test_restart import alive, wait_until_gone


@contextlib.contextmanager
def filled(directory: Path) -> Iterator[None]:
    """The file system of `directory` full to its last byte until the block ends."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out, pytest.raises(OSError, match="No space left"):
        while True:
            out.write(b"\0" * 4096)
    try:
        yield
    finally:
        filler.unlink()


async def test_a_run_whose_running_record_cannot_be_written_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tmpfs(tmp_path / "state", "64k") as state:
        async with running_manager(tmp_path, monkeypatch) as m:
            run = asyncio.ensure_future(m.stub.Run(run_request("late")))
            await wait_for(
                lambda: (
                    (vm := m.service.computations().get("late")) is not None
                    and vm.state is VmState.STARTING
                ),
                "the VM to be starting",
            )
            machine = m.service.computations()["late"]
            assert machine.process is not None
            pid = machine.process.pid
            os.kill(pid, signal.SIGSTOP)  # a slow boot: QMP answers only once it goes on
            # The version before STARTING is unlinked once STARTING's is durable: then full.
            await wait_for(lambda: len(list(state.glob("vm-*.json"))) == 1, "one version")
            try:
                with filled(state):
                    os.kill(pid, signal.SIGCONT)
                    error = await run_error(run)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MANAGER_STATE_DIR: no space left" in (error.details() or "")
            await assert_nothing_left(m)
            await m.stub.Run(run_request("room-again"))
            await m.stub.Stop(pb.StopRequest(computation_id="room-again"))
            await assert_nothing_left(m)


async def test_a_restart_with_a_full_state_dir_keeps_its_running_vms(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    with tmpfs(tmp_path / "state", "64k") as state:
        first = Daemon(env=env, log=tmp_path / "first.log")
        await first.start()
        await first.stub.Run(run_request("kept"))
        assert await first.terminate() == 0  # an upgrade: the VM is left running
        (record,) = newest_records(state)
        pid = int(str(record["pid"]))
        with filled(state):
            second = Daemon(env=env, log=tmp_path / "second.log")
            await second.start()
            try:
                assert await running(second) == ["kept"] and alive(pid)
            finally:
                assert await second.terminate() == 0
        third = Daemon(env=env, log=tmp_path / "third.log")  # room again: still there
        await third.start()
        try:
            assert await running(third) == ["kept"] and alive(pid)
            await third.stub.Stop(pb.StopRequest(computation_id="kept"))
            await wait_until_gone(pid)
            assert newest_records(state) == [] and os.listdir(tmp_path / "vms") == []
        finally:
            await third.terminate()


async def running(daemon: Daemon) -> list[str]:
    listed = await daemon.stub.List(pb.ListRequest())
    return [c.computation_id for c in listed.computations if c.state == "running"]


async def test_a_halted_vm_kept_for_inspection_survives_a_full_state_dir_and_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MANAGER_QEMU_ON_GUEST_HALT=keep: a guest halted while its record could not say so (a
    full state directory; or a halt while no daemon ran) is found halted at the next start,
    its record saying running, and kept paused for inspection; it was killed as a QEMU whose
    monitor "does not answer"."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "halt-after:1.0:internal-error")
    env = {"MANAGER_SHUTDOWN_STOPS_VMS": "false", "MANAGER_QEMU_ON_GUEST_HALT": "keep"}
    vms = str(tmp_path / "vms")
    qemus: list[int] = []  # this process's children (the first daemon ran in it): reaped here
    try:
        with tmpfs(tmp_path / "state", "64k") as state:
            async with running_manager(tmp_path, monkeypatch, **env) as m:
                await m.stub.Run(run_request("kept"))
                machine = m.service.computations()["kept"]
                await wait_for(lambda: len(list(state.glob("vm-*.json"))) == 1, "one version")
                with filled(state):
                    await wait_for(lambda: machine.state is VmState.PAUSED, "the guest halted")
                    assert [r["state"] for r in newest_records(state)] == ["running"]
            (pid,) = qemus[:] = processes_mentioning(vms)
            async with running_manager(tmp_path, monkeypatch, **env) as again:
                adopted = again.service.computations()["kept"]
                assert adopted.state is VmState.PAUSED and not adopted.operator_paused
                assert adopted.halt == {"qemu_status": "internal-error"}  # Get's paused_by
                assert adopted.process is not None and adopted.process.pid == pid
                await again.stub.Stop(pb.StopRequest(computation_id="kept"))
                assert processes_mentioning(vms) == []
    finally:
        kill_and_reap(sorted({*qemus, *processes_mentioning(vms)}))
