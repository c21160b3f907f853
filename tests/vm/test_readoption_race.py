"""A re-adopted VM whose QEMU dies while the restart reads its console's history (an await of
recovery) is released as any other VM: it used to be registered only after that read, so a
VM already released was registered then: its id refused to a new Run (ALREADY_EXISTS), a place
of MANAGER_MAX_VMS taken, and its pacing never restored."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu.streams import QemuOutput
from tests.support.harness import run_request, running_manager
from tests.support.processes import kill_and_reap, processes_mentioning


async def test_a_vm_that_dies_while_its_history_is_read_is_not_left_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = str(tmp_path / "vms")
    env = {"MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    qemus: list[int] = []  # this process's children (the first daemon ran in it): reaped here
    try:
        async with running_manager(tmp_path, monkeypatch, **env) as m:
            await m.stub.Run(run_request("dies"))
        (pid,) = qemus[:] = processes_mentioning(vms)
        read = QemuOutput.history_read

        async def dies_meanwhile(output: QemuOutput, timeout: float) -> None:
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(1.0)  # its release runs meanwhile
            await read(output, timeout)

        monkeypatch.setattr(QemuOutput, "history_read", dies_meanwhile)
        async with running_manager(tmp_path, monkeypatch, **env) as again:
            monkeypatch.setattr(QemuOutput, "history_read", read)
            assert "dies" not in again.service.computations()
            await again.stub.Run(run_request("dies"))  # the id is free
            await again.stub.Stop(pb.StopRequest(computation_id="dies"))
    finally:
        kill_and_reap(sorted({*qemus, *processes_mentioning(vms)}))
