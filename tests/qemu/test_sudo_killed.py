"""sudo itself killed (OOM killer, an operator's `kill -9`) while its QEMU runs.

The daemon watches sudo's pidfd: sudo's end reads as the VM's end, the VM is released (its
port, CID and VNC display handed to the next Run, its files removed) while root's QEMU, now
init's child, ran on untracked; its still-open QMP session now quits it. The stand-in `sudo` first on PATH takes sudo's options up to
`--`, runs the command as its child and relays SIGTERM, as sudo does.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cocos_manager.vm.lifecycle import VmState
from tests.support.harness import run_request, running_manager
from tests.support.processes import processes_mentioning
from tests.support.waiting import wait_for

FAKE_SUDO = """#!/bin/sh
while [ "$1" != "--" ]; do shift; done
shift
"$@" &
child=$!
trap 'kill -TERM $child' TERM
wait $child
wait $child
"""


async def test_a_killed_sudo_does_not_leave_its_qemu_running_untracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sudo = bin_dir / "sudo"
    sudo.write_text(FAKE_SUDO)
    sudo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    vms = str(tmp_path / "vms")
    try:
        async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_USE_SUDO="true") as m:
            await m.stub.Run(run_request("c1"))
            machine = m.service.computations()["c1"]
            assert machine.process is not None and machine.process.wrapped
            qemu = [pid for pid in processes_mentioning(vms) if pid != machine.process.pid]
            assert qemu, "the stand-in sudo runs QEMU as its child"
            os.kill(machine.process.pid, signal.SIGKILL)
            await wait_for(lambda: machine.state is VmState.RELEASED, "the VM released")
            alive = [pid for pid in qemu if pid in processes_mentioning(vms)]
            assert alive == [], f"QEMU {alive} runs on after its VM was released"
    finally:
        for pid in processes_mentioning(vms):
            os.kill(pid, signal.SIGKILL)
