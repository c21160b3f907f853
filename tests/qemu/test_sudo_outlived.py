"""A QEMU that outlived its sudo is told apart by its command line and start (sudo_stop.outlived):
never another VM's, never one that ran before this VM's sudo, never sudo's own processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from cocos_manager.host.processes import process_identity, process_start_time, processes_since
from cocos_manager.qemu import sudo as sudo_module
from cocos_manager.qemu.sudo import SETTLE, end_outlived, outlived, outlived_settled
from tests.support.waiting import unavailable


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def ticks_now() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def run(started: list[subprocess.Popen[bytes]], *argv: str, executable: str | None = None) -> int:
    """Started, with its command line shown: Popen returns once exec has swapped the child's
    memory, a moment before the kernel sets up its arguments (a loaded CI host read none)."""
    process = subprocess.Popen(argv, executable=executable, stdin=subprocess.PIPE)  # sh waits
    started.append(process)
    while process.poll() is None and process_identity(process.pid) is None:
        time.sleep(0.001)
    return process.pid


def test_only_this_vms_command_started_after_its_sudo(
    started: list[subprocess.Popen[bytes]],
) -> None:
    vm, other = f"vm-{uuid.uuid4()}", f"vm-{uuid.uuid4()}"
    script = "read -r line; :"
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


async def test_a_command_sudo_had_not_yet_execd_is_waited_for_and_ended(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """sudo killed between its fork and its child's exec: the child shows sudo's command line
    (left out: it is sudo's use_pty monitor's too) until it becomes QEMU a moment later. A
    single look found nothing and QEMU ran on, nobody's. The child here execs once told, while
    the look is under way."""
    vm, script = f"vm-{uuid.uuid4()}", "read -r line; :"
    argv = ["sudo", "-n", "-C", "5", "--", "/bin/sh", "-c", script, vm]
    becomes = "import os, sys; sys.stdin.readline(); os.execv('/bin/sh', ['/bin/sh', '-c', %r, %r])"
    child = run(started, "sudo", "-I", "-S", "-c", becomes % (script, vm), *argv[1:],
                executable="/usr/bin/python3")  # fmt: skip
    since = process_start_time(child)
    assert outlived(argv, since) == []  # still "sudo"
    ended: list[int] = []

    async def quit_qemu() -> bool:
        ended.extend(outlived(argv, since))
        started[-1].kill()
        return True

    ending = asyncio.ensure_future(end_outlived(argv, child, since, quit_qemu, session=True))
    await asyncio.sleep(0.2)
    assert not ending.done(), "it concluded while sudo's child had not exec'd yet"
    stdin = started[-1].stdin
    assert stdin is not None
    stdin.write(b"exec\n")
    stdin.flush()
    assert await ending
    assert ended == [child]
    assert started[-1].wait(5) == -9


async def test_a_cancelled_look_ends_at_once(started: list[subprocess.Popen[bytes]]) -> None:
    """The daemon's shutdown cancels a stop waiting on sudo's child: the look ends with it.
    Its waits were once in a thread, which a cancellation does not reach: the shutdown then
    waited for it, up to GIVE_UP_AFTER."""
    vm, script = f"vm-{uuid.uuid4()}", "read -r line; :"
    argv = ["sudo", "-n", "--", "/bin/sh", "-c", script, vm]
    child = run(started, "sudo", "-I", "-S", "-c", "import sys; sys.stdin.readline()",
                *argv[1:], executable="/usr/bin/python3")  # fmt: skip
    looking = asyncio.ensure_future(outlived_settled(argv, process_start_time(child)))
    await asyncio.sleep(0.1)
    looking.cancel()
    await asyncio.wait([looking], timeout=1.0)
    assert looking.cancelled()


async def test_sudos_own_copy_is_waited_for_past_settle(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """sudo's child still before its exec after SETTLE (a starved host, a stopped process
    group): it shows this VM's arguments, so it is this VM's QEMU to be, waited for (up to
    GIVE_UP_AFTER) and found, not given up on after SETTLE to run on, nobody's. The child here
    execs once told, SETTLE and a half after the look began."""
    vm, script = f"vm-{uuid.uuid4()}", "read -r line; :"
    argv = ["sudo", "-n", "--", "/bin/sh", "-c", script, vm]
    becomes = "import os, sys; sys.stdin.readline(); os.execv('/bin/sh', ['/bin/sh', '-c', %r, %r])"
    child = run(started, "sudo", "-I", "-S", "-c", becomes % (script, vm), *argv[1:],
                executable="/usr/bin/python3")  # fmt: skip
    stdin = started[-1].stdin
    assert stdin is not None

    def tell() -> None:
        time.sleep(SETTLE * 1.5)
        stdin.write(b"exec\n")
        stdin.flush()

    teller = threading.Thread(target=tell)
    teller.start()
    try:
        assert await outlived_settled(argv, process_start_time(child)) == [child]
    finally:
        teller.join()


OUTSIDER = """
import ctypes, os, subprocess, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x20000000):  # CLONE_NEWPID: children's
    raise OSError(ctypes.get_errno(), "setns")
child = subprocess.Popen(["sleep", "600"])
print(flush=True)
sys.stdin.read(1)  # reaps its child (in the namespace) only once told
"""


def test_a_process_held_in_its_exit_is_not_a_command_mid_exec(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """A process in exit has no command line from the moment its memory is freed until it is a
    zombie: a moment, or seconds for a few GiB (another VM's QEMU), or for as long as its exit
    waits (a PID namespace's init waits for every process of the namespace to be reaped; a
    flush on a hung network file system). Counted as a command mid-exec, it kept every settle
    after a sudo's death waiting its whole SETTLE. Here a namespace's init is held in its exit
    by a process of the namespace whose parent, outside it, does not reap it yet."""
    if os.geteuid() != 0:
        unavailable("needs root: it makes a PID namespace and joins it")
    since = ticks_now()
    namespace = subprocess.Popen(
        ["unshare", "--pid", "--fork", "sh", "-c", "echo; read -r line"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    started.append(namespace)
    assert namespace.stdout is not None and namespace.stdin is not None
    namespace.stdout.readline()
    with open(f"/proc/{namespace.pid}/task/{namespace.pid}/children") as children:
        init = int(children.read().split()[0])
    outsider = subprocess.Popen(
        [sys.executable, "-c", OUTSIDER, f"/proc/{init}/ns/pid"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    started.append(outsider)
    assert outsider.stdout is not None
    outsider.stdout.readline()
    namespace.stdin.close()  # the init exits, and waits in its exit
    while process_identity(init) is not None:  # until its memory (command line) is gone
        time.sleep(0.001)
    with open(f"/proc/{init}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    assert fields[0] not in (b"Z", b"X") and int(fields[6]) & 0x4  # in its exit, held there
    assert init not in [pid for pid, argv in processes_since(since) if argv is None]
    argv = ["sudo", "-n", "--", "/bin/sh", "-c", "read -r line; :", f"vm-{uuid.uuid4()}"]
    assert asyncio.run(outlived_settled(argv, since)) == []


async def test_sudos_own_copy_looked_at_mid_exec_past_settle_is_still_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The look above, when it falls on the moment sudo's child execs QEMU (its command line
    empty: mid-exec) after SETTLE: it gave up there and returned nothing, and that QEMU ran on,
    nobody's (a CI run of the test above). The moment cannot be held open for a real process,
    so the looks are given: sudo's own seen, then mid-exec past SETTLE, then QEMU."""
    looks = iter([([], True, False)] + [([], False, True)] * 3 + [([4242], False, False)])

    def scan(argv: object, since: int) -> tuple[list[int], bool, bool]:
        time.sleep(SETTLE / 2)
        return next(looks)

    monkeypatch.setattr(sudo_module, "_scan", scan)
    assert await outlived_settled(["sudo", "-n", "--", "/q", "-name", "vm"], 0) == [4242]
