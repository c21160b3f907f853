"""What a restart finds (state directory full, paused VMs left running)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest

from cocos_manager.host.state_lock import StateDirLockedError, StateLock
from cocos_manager.vm.lifecycle import VmState
from tests.support.harness import run_request, running_manager
from tests.support.processes import is_console_keeper, kill_and_reap, processes_mentioning
from tests.support.waiting import wait_for
from tests.test_faults import tmpfs


async def test_a_vm_whose_record_could_not_name_its_qemu_is_not_lost_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MANAGER_STATE_DIR has room for the admission record only (and the list of launch directories): every later version (the one
    naming QEMU's PID) fails with ENOSPC. A VM whose record does not name its QEMU cannot be
    found by the next start: either the Run fails, or the VM is still tracked after a
    restart; never a QEMU running that no daemon knows of."""
    vms = str(tmp_path / "vms")
    leave = {"MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    try:
        # One page for the list of launch directories (host/launch_dirs.py), one for the record.
        with tmpfs(tmp_path / "state", "8k"):
            async with running_manager(tmp_path, monkeypatch, **leave) as m:
                try:
                    await m.stub.Run(run_request("full"))
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "MANAGER_STATE_DIR" in (error.details() or "")
                    assert processes_mentioning(vms) == []
                    assert list((tmp_path / "state").glob("vm-*")) == [], "no record left"
                    return
            async with running_manager(tmp_path, monkeypatch, **leave) as again:
                tracked = again.service.computations()
                # Not its console keeper, which may still be on its way out after recovery
                # killed its QEMU (tests/qemu/test_spawn_crash.py).
                alive = [pid for pid in processes_mentioning(vms) if not is_console_keeper(pid)]
                assert alive == [] or "full" in tracked, f"QEMU {alive} runs untracked"
    finally:
        for pid in processes_mentioning(vms):
            os.kill(pid, signal.SIGKILL)


async def test_a_paused_vm_left_for_the_next_start_is_adopted_not_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "halt-after:0.1:internal-error")
    vms = str(tmp_path / "vms")
    env = {"MANAGER_SHUTDOWN_STOPS_VMS": "false", "MANAGER_QEMU_ON_GUEST_HALT": "keep"}
    left: list[int] = []
    try:
        async with running_manager(tmp_path, monkeypatch, **env) as m:
            await m.stub.Run(run_request("kept"))
            machine = m.service.computations()["kept"]
            await wait_for(lambda: machine.state is VmState.PAUSED, "the guest halted")
        left = processes_mentioning(vms)
        assert left, "SHUTDOWN_STOPS_VMS=false left the paused VM running"
        async with running_manager(tmp_path, monkeypatch, **env) as again:
            assert "kept" in again.service.computations(), f"QEMU {left} killed at restart"
    finally:
        kill_and_reap(sorted(set(processes_mentioning(vms)) | set(left)))


def test_a_full_state_dir_still_gives_the_lock_not_a_traceback(tmp_path: Path) -> None:
    """The PID in the lock file is only for the second daemon's message: a state directory
    with no space left made `cocos-manager` end in an OSError traceback at start."""
    with tmpfs(tmp_path / "state", "4k") as state:
        (state / "filler").write_bytes(bytes(4096))
        with StateLock(state) as lock:
            assert lock.held
            with pytest.raises(StateDirLockedError, match="in use by another cocos-manager"):
                StateLock(state).acquire()
        (state / "filler").unlink()
