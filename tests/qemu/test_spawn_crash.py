"""The daemon killed while a spawn runs in its worker thread.

Until the loop takes the finished spawn, the VM's record is the admission's: pid 0, no argv.
A daemon SIGKILLed there leaves a QEMU (its own session, so it survives) that the next start
cannot find: recovery reads pid 0 as "its QEMU is gone", removes the record and the files,
and the QEMU runs on untracked, holding its port, CID and VNC display. The on-disk state at
that instant is reproduced by snapshotting the records while the spawn is held in the thread
and putting the snapshot back before the restart.

QEMU's console keeper (qemu/console_keeper.py) holds a file in the VM's folder: it ends on its own
once its QEMU is gone and the pipes run dry, which on a loaded host can be after the restart
has finished. It is no QEMU, and the check tells the two apart: it used to count a keeper
still on its way out as "QEMU runs untracked" (now and then under load). The keeper is held
stopped across the restart here, so that worst case happens every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from cocos_manager.qemu import process as qemu_process
from tests.support.harness import run_request, running_manager
from tests.support.processes import (
    console_keepers,
    gone_within,
    is_console_keeper,
    kill_and_reap,
    processes_mentioning,
)
from tests.support.waiting import wait_for


def records_on_disk(state: Path) -> dict[str, bytes]:
    """The record files now. A version the sync thread unlinks between the listing and the
    read (superseded by one already durable) is left out, as a crash then would leave it."""
    found = {}
    for path in state.glob("vm-*.json"):
        with contextlib.suppress(FileNotFoundError):
            found[path.name] = path.read_bytes()
    return found


async def test_a_qemu_spawned_as_the_daemon_died_is_found_by_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = str(tmp_path / "vms")
    state = tmp_path / "state"
    leave = {"MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    loop = asyncio.get_running_loop()
    spawned: asyncio.Future[None] = loop.create_future()
    go_on = threading.Event()
    real_spawn = qemu_process.spawn
    spawned_pids: list[int] = []

    def held_spawn(
        argv: list[str], qmp_fd: int, env: dict[str, str] | None, **pipes: int
    ) -> tuple[subprocess.Popen[bytes], int]:
        result = real_spawn(argv, qmp_fd, env, **pipes)
        spawned_pids.append(result[0].pid)
        loop.call_soon_threadsafe(spawned.set_result, None)
        go_on.wait(30)
        return result

    try:
        async with running_manager(tmp_path, monkeypatch, **leave) as m:
            monkeypatch.setattr(qemu_process, "spawn", held_spawn)
            run = asyncio.ensure_future(m.stub.Run(run_request("crash")))
            await spawned
            at_crash = records_on_disk(state)
            go_on.set()
            await run
            monkeypatch.setattr(qemu_process, "spawn", real_spawn)
        assert processes_mentioning(vms), "SHUTDOWN_STOPS_VMS=false left the VM running"
        await wait_for(lambda: console_keepers(vms), "QEMU's console keeper")
        [keeper] = console_keepers(vms)
        os.kill(keeper, signal.SIGSTOP)  # slow to notice its QEMU's end, as under load
        for path in state.glob("vm-*.json"):
            path.unlink()
        for name, data in at_crash.items():
            (state / name).write_bytes(data)
        async with running_manager(tmp_path, monkeypatch, **leave) as again:
            qemus = [pid for pid in processes_mentioning(vms) if not is_console_keeper(pid)]
            tracked = again.service.computations()
            assert qemus == [] or "crash" in tracked, f"QEMU {qemus} runs untracked"
            os.kill(keeper, signal.SIGCONT)
            if "crash" not in tracked:  # its QEMU is gone, so it ends, nobody's process
                assert gone_within(keeper, 30), f"console keeper {keeper} outlived its QEMU"
    finally:
        go_on.set()
        kill_and_reap(processes_mentioning(vms) + spawned_pids)
