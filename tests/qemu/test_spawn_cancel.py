"""A start cancelled while the spawn runs in its worker thread.

Behind MANAGER_QEMU_USE_SUDO the spawned process is sudo, and QEMU is sudo's child: a loop slow
to pick up the finished spawn (a burst) may find sudo has already started QEMU. SIGKILLing sudo
then leaves QEMU running, nobody's. The stand-in `sudo` here is a shell script (its name is what
marks a process as wrapped) that starts the command as its child and says the child's pid.
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

from cocos_manager.host import workers
from cocos_manager.qemu import process as qemu_process
from cocos_manager.qemu import qmp
from tests.support.processes import gone_within

FAKE_SUDO = '#!/bin/sh\n"$@" &\necho $!\nwait\n'


async def test_a_start_cancelled_during_the_spawn_leaves_no_qemu_behind_sudo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sudo = tmp_path / "sudo"
    sudo.write_text(FAKE_SUDO)
    sudo.chmod(0o755)
    loop = asyncio.get_running_loop()
    in_thread: asyncio.Future[int] = loop.create_future()
    real_spawn = qemu_process.spawn

    def spawn_then_slow_loop(
        argv: list[str], qmp_fd: int, env: dict[str, str] | None
    ) -> tuple[subprocess.Popen[bytes], int]:
        popen, start_time = real_spawn(argv, qmp_fd, env)
        assert popen.stdout is not None
        child = int(popen.stdout.readline())  # sudo has started "QEMU" before the loop looks
        loop.call_soon_threadsafe(in_thread.set_result, child)
        return popen, start_time

    monkeypatch.setattr(qemu_process, "spawn", spawn_then_slow_loop)
    listener = qmp.qmp_listener(tmp_path / "qmp.sock")
    start = asyncio.ensure_future(
        qemu_process.QemuProcess.start([str(sudo), "sleep", "600"], qmp_listener=listener)
    )
    child = await in_thread
    try:
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        assert gone_within(child, 3.0), "sudo's child (QEMU) outlived the cancelled start"
    finally:
        listener.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


async def test_a_start_cancelled_while_its_spawn_waits_for_a_worker_spawns_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst fills the worker threads; a Run cancelled (a client gone, the daemon shutting
    down) while its spawn still waits for a thread started its QEMU anyway, only to kill it."""
    spawned: list[list[str]] = []
    real_spawn = qemu_process.spawn

    def counting_spawn(
        argv: list[str], qmp_fd: int, env: dict[str, str] | None
    ) -> tuple[subprocess.Popen[bytes], int]:
        spawned.append(argv)
        return real_spawn(argv, qmp_fd, env)

    monkeypatch.setattr(qemu_process, "spawn", counting_spawn)
    loop = asyncio.get_running_loop()
    release = threading.Event()
    busy = [
        loop.run_in_executor(workers.start_pool, release.wait, 30)
        for _ in range(workers.START_WORKERS)
    ]
    listener = qmp.qmp_listener(tmp_path / "qmp.sock")
    try:
        start = asyncio.ensure_future(
            qemu_process.QemuProcess.start(["sleep", "600"], qmp_listener=listener)
        )
        await asyncio.sleep(0)  # one loop turn: the start has queued its spawn
        start.cancel()
        await asyncio.wait([start], timeout=5)  # answered without waiting for a worker
        release.set()
        await asyncio.gather(*busy)
        with pytest.raises(asyncio.CancelledError):
            await start
        await loop.run_in_executor(workers.start_pool, lambda: None)  # the queue has drained
        assert spawned == [], "a start cancelled before its spawn ran still started QEMU"
    finally:
        release.set()
        listener.close()
