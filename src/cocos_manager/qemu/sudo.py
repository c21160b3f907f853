"""QEMU through sudo (MANAGER_QEMU_USE_SUDO): what sudo's refusals mean, and stopping a QEMU
the daemon may not signal (root's QEMU behind sudo, or an adopted process of another user).

A signal to such a process fails with EPERM, so the ways around it live here, apart from
the ordinary pidfd signalling in qemu/process.py: finding QEMU among sudo's descendants,
QMP `quit` (needs only the socket), `sudo -n kill -KILL`, and the error that names the PID
and the sudoers rule when nothing worked (see docs/decisions.md, "QEMU through sudo").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from cocos_manager.errors import QemuStopFailedError, SudoRefusedError
from cocos_manager.host import process_ended, processes_since
from cocos_manager.qemu.failures import daemon_user, sudoers_lines
from cocos_manager.qemu.qmp import QmpError, QmpMonitor
from cocos_manager.telemetry import get_logger

_log = get_logger()
# A QEMU behind sudo is root's: the daemon may signal sudo (its real uid is the daemon's) but
# not QEMU. These bound the ways around that (see docs/decisions.md, "QEMU through sudo").
SUDO_TERM_GRACE = 5.0  # a SIGTERM relayed by sudo, or QMP quit: QEMU exits within milliseconds
SUDO_KILL_TIMEOUT = 5.0  # `sudo -n kill -KILL`
GIVE_UP_AFTER = 10.0  # after every way to kill QEMU was tried: the VM is released anyway
SETTLE = 1.0  # a process mid-exec, anybody's: if it is to be QEMU, running QEMU by then


def descendants(pid: int) -> list[int]:
    """Children first, then theirs (sudo's monitor process with use_pty, then QEMU); the
    zombies among them are left out."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop(0)
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as children:
                kids = [int(child) for child in children.read().split()]
        except (OSError, ValueError):
            kids = []
        found += kids
        queue += kids
    return [pid for pid in found if not process_ended(pid)]


def outlived(argv: Sequence[str], since: int) -> list[int]:
    """Processes running the command sudo was given (`argv` is sudo's) that sudo did not take
    along when it ended. A SIGTERM that reaches sudo 1.9 as it starts its command kills sudo
    and not the command (measured: 2-3 of 60-90 signals sent 0-30 ms after the spawn), and a
    SIGKILLed sudo never relays: QEMU then runs on, root's and init's child.

    Told apart by their command line, which ends with this VM's own QEMU arguments (ports,
    CID, files: no two VMs share them; an interpreter may come first, as for a script), and by
    a start no earlier than sudo's. Reads /proc: run it off the event loop."""
    return _scan(argv, since)[0]


async def outlived_settled(argv: Sequence[str], since: int) -> list[int]:
    """`outlived`, once sudo's command is past its exec: a sudo killed as it started QEMU may
    leave its child between fork and exec, showing sudo's command line or, mid-exec, none; a
    look then would find nothing while QEMU is a moment from running. Waits while one of
    sudo's own shows this command's arguments (it execs or exits: on a starved host that may
    take more than a moment), up to GIVE_UP_AFTER, and up to SETTLE while any process is
    mid-exec (it may be anybody's). One look per thread hop, the waits on the loop: a
    cancellation (the daemon's shutdown) ends it at once, not after its last look."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    seen_ours = False
    while True:
        found, ours, mid_exec = await asyncio.to_thread(_scan, argv, since)
        waited = loop.time() - began
        # Once one of sudo's own was seen, a process mid-exec may be it, becoming QEMU (on a
        # loaded host that moment is long enough to be looked at): waited for as it was.
        seen_ours = seen_ours or ours
        waiting = ((ours or (seen_ours and mid_exec)) and waited < GIVE_UP_AFTER) or (
            mid_exec and waited < SETTLE
        )
        if found or not waiting:
            return found
        await asyncio.sleep(0.01)


def _scan(argv: Sequence[str], since: int) -> tuple[list[int], bool, bool]:
    """(the command's processes, whether one of sudo's own ends with the command's arguments:
    its child before exec or its use_pty monitor, whether any process is mid-exec), from one
    look at each process."""
    command = list(argv[argv.index("--") + 1 :]) if "--" in argv else []
    arguments = command[1:]
    if not arguments:
        return [], False, False
    found, ours, mid_exec = [], False, False
    for pid, cmdline in processes_since(since):
        if cmdline is None:
            mid_exec = True
        elif len(cmdline) > len(arguments) and cmdline[-len(arguments) :] == arguments:
            if os.path.basename(cmdline[0]) == "sudo":
                ours = True
            else:
                found.append(pid)
    return found, ours, mid_exec


def sudo_refused(argv: Sequence[str], line: str, kind: str) -> SudoRefusedError:
    """Why sudo would not start QEMU, with the sudoers lines that fix it: the daemon has no
    terminal, so a refusal is final and must say what to change."""
    qemu = argv[argv.index("--") + 1] if "--" in argv else "QEMU"
    missing = {
        "nopasswd": "sudo wants a password, and the daemon has no terminal to give one",
        "closefrom": "sudo does not let the daemon keep QEMU's QMP socket open (-C)",
        "rule": "sudo has no rule that lets this user run QEMU as root",
    }.get(kind, "sudo refused to run QEMU")
    return SudoRefusedError(
        f"MANAGER_QEMU_USE_SUDO=true: {missing} ({line.strip()}): add to sudoers "
        f"{sudoers_lines(daemon_user(), qemu)}, or set MANAGER_QEMU_USE_SUDO=false"
    )


async def quit_over_qmp(monitor: QmpMonitor | None, qmp_path: Path | None, pid: int) -> bool:
    """QMP `quit`: QEMU exits as on SIGTERM, and no permission is needed but the socket's.
    Over the VM's session, or a new one when none is open (a start being abandoned)."""
    opened = False
    try:
        if monitor is None or monitor.closed.done():
            if qmp_path is None:
                return False
            async with asyncio.timeout(2.0):
                monitor = await QmpMonitor.connect(qmp_path)
            opened = True
        with contextlib.suppress(QmpError, ConnectionError):  # closed: it is quitting
            async with asyncio.timeout(SUDO_TERM_GRACE):
                await monitor.execute("quit")
        return True
    except (OSError, TimeoutError) as error:
        _log.warning("QMP quit failed", pid=pid, error=repr(error))
        return False
    finally:
        if opened and monitor is not None:
            await monitor.close()


async def sudo_kill(pids: Sequence[int], pid: int) -> bool:
    """`sudo -n kill -KILL`: for a QEMU that neither a relayed signal nor QMP stopped."""
    kill = shutil.which("kill") or "/usr/bin/kill"
    try:
        child = await asyncio.create_subprocess_exec(
            "sudo", "-n", kill, "-KILL", *map(str, pids),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
    except OSError as error:
        _log.error("cannot run sudo kill", pid=pid, error=error.strerror)
        return False
    try:
        async with asyncio.timeout(SUDO_KILL_TIMEOUT):
            _, err = await child.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
        return False
    if child.returncode != 0:
        _log.warning("sudo kill refused", pid=pid, stderr=err.decode("utf-8", "replace").strip())
    return child.returncode == 0


def stop_failed(
    argv: Sequence[str], pid: int, pids: Sequence[int], wrapped: bool
) -> QemuStopFailedError:
    """The error for a QEMU nothing ended: which process is left, and the rule that would
    let the daemon kill it."""
    qemu = argv[argv.index("--") + 1] if "--" in argv else argv[0]
    kill = shutil.which("kill") or "/usr/bin/kill"
    under = f", under sudo pid {pid}" if wrapped else ""
    return QemuStopFailedError(
        f"QEMU (pid {', '.join(map(str, pids))}{under}) did not exit and this daemon "
        f"(user {daemon_user()}) may not kill it: it was left running; kill it as root, and "
        f"allow the daemon to with {sudoers_lines(daemon_user(), qemu, kill)}"
    )


async def end_outlived(
    argv: Sequence[str],
    pid: int,
    since: int,
    quit_qemu: Callable[[], Awaitable[bool]],
    *,
    session: bool,
) -> bool:
    """Ends a QEMU that outlived its sudo (`outlived`): out of reach of the daemon's pidfd and,
    being root's, of its signals. QMP `quit` over the open `session` if any, else `sudo kill`,
    else `quit` over a new session; gone within GIVE_UP_AFTER, or QemuStopFailedError names
    it. `pid` is sudo's. Returns whether there was one."""
    loop = asyncio.get_running_loop()
    pids = await outlived_settled(argv, since)
    if not pids:
        return False
    _log.warning("QEMU outlived sudo: ending it", sudo_pid=pid, pids=pids)
    if not (session and await quit_qemu()):
        # Found again: a QMP quit that failed can take seconds, and a PID that ended meanwhile
        # may be another process's by now (`sudo kill` is root's).
        pids = await asyncio.to_thread(outlived, argv, since)
        if pids and not await sudo_kill(pids, pid):
            await quit_qemu()
    deadline = loop.time() + GIVE_UP_AFTER
    while left := await asyncio.to_thread(outlived, argv, since):
        if loop.time() > deadline:
            raise stop_failed(argv, pid, left, True)
        await asyncio.sleep(0.05)
    return True
