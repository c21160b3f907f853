"""The daemon killed while a spawn runs in its worker thread.

Until the loop takes the finished spawn, the VM's record is the admission's: pid 0, no argv.
A daemon SIGKILLed there leaves a QEMU (its own session, so it survives) that the next start
cannot find: recovery reads pid 0 as "its QEMU is gone", removes the record and the files,
and the QEMU runs on untracked, holding its port, CID and VNC display. The on-disk state at
that instant is reproduced by snapshotting the records while the spawn is held in the thread
and putting the snapshot back before the restart.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from pathlib import Path

import pytest

from cocos_manager.qemu import process as qemu_process
from tests.support.harness import run_request, running_manager
from tests.support.processes import kill_and_reap, processes_mentioning


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
            at_crash = {p.name: p.read_bytes() for p in state.glob("vm-*.json")}
            go_on.set()
            await run
            monkeypatch.setattr(qemu_process, "spawn", real_spawn)
        assert processes_mentioning(vms), "SHUTDOWN_STOPS_VMS=false left the VM running"
        for path in state.glob("vm-*.json"):
            path.unlink()
        for name, data in at_crash.items():
            (state / name).write_bytes(data)
        async with running_manager(tmp_path, monkeypatch, **leave) as again:
            alive = processes_mentioning(vms)
            tracked = again.service.computations()
            assert alive == [] or "crash" in tracked, f"QEMU {alive} runs untracked"
    finally:
        go_on.set()
        kill_and_reap(processes_mentioning(vms) + spawned_pids)
