"""A QEMU that outlived its sudo is told apart by its command line and start (sudo_stop.outlived):
never another VM's, never one that ran before this VM's sudo, never sudo's own processes."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from cocos_manager.host.state_store import process_start_time
from cocos_manager.qemu.sudo import outlived


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def ticks_now() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def run(started: list[subprocess.Popen[bytes]], *argv: str) -> int:
    process = subprocess.Popen(argv)  # `; :` keeps sh from exec'ing sleep: its cmdline stays
    started.append(process)
    return process.pid


def test_only_this_vms_command_started_after_its_sudo(
    started: list[subprocess.Popen[bytes]],
) -> None:
    vm, other = f"vm-{uuid.uuid4()}", f"vm-{uuid.uuid4()}"
    script = "sleep 600; :"
    before = run(started, "sh", "-c", script, vm)  # the same line, older than this VM's sudo
    while ticks_now() <= process_start_time(before):  # start times count 1/100 s ticks
        pass
    sudo = run(started, "sleep", "600")
    since = process_start_time(sudo)
    later = [run(started, "sh", "-c", script, vm) for _ in range(2)]
    run(started, "sh", "-c", script, other)  # another VM
    argv = ["sudo", "-n", "-C", "5", "--", "/bin/sh", "-c", script, vm]
    assert sorted(outlived(argv, since)) == sorted(later)
    assert outlived(["sudo", "/bin/sh", "-c", script, vm], since) == []  # no "--": not ours
