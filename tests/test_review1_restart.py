"""Adversarial review: restarts after a state directory that filled up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest

from tests.support.harness import run_request, running_manager
from tests.support.processes import processes_mentioning
from tests.test_faults import tmpfs


async def test_a_vm_whose_record_could_not_name_its_qemu_is_not_lost_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MANAGER_STATE_DIR has room for the admission record only: every later version (the one
    naming QEMU's PID) fails with ENOSPC. A VM whose record does not name its QEMU cannot be
    found by the next start: either the Run fails, or the VM is still tracked after a
    restart; never a QEMU running that no daemon knows of."""
    vms = str(tmp_path / "vms")
    leave = {"MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    try:
        with tmpfs(tmp_path / "state", "4k"):
            async with running_manager(tmp_path, monkeypatch, **leave) as m:
                try:
                    await m.stub.Run(run_request("full"))
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "MANAGER_STATE_DIR" in (error.details() or "")
                    assert processes_mentioning(vms) == []
                    return
            async with running_manager(tmp_path, monkeypatch, **leave) as again:
                tracked = again.service.computations()
                alive = processes_mentioning(vms)
                assert alive == [] or "full" in tracked, f"QEMU {alive} runs untracked"
    finally:
        for pid in processes_mentioning(vms):
            os.kill(pid, signal.SIGKILL)
