"""What "no process left behind" means, read from /proc."""

from __future__ import annotations

import contextlib
import os
import select
import signal
from pathlib import Path


def autogroup_nice(pid: int) -> int | None:
    """The nice of the process's session autogroup; None in the kernel's root autogroup (where
    a CI runner that never began a session of its own leaves its tests)."""
    from cocos_manager.host.sched_weight import session_nice

    return session_nice(Path(f"/proc/{pid}/autogroup"))


def _stat_fields(pid: str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def children(mentioning: str | None = None) -> list[int]:
    """Processes whose parent is this test process, live or zombie; with `mentioning`, only
    those whose command line names it (a zombie's is empty: its name in /proc/PID/stat is
    checked then), so a test sees its own VMs and not another test's helpers."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        mine = entry.isdigit() and (fields := _stat_fields(entry)) and int(fields[1]) == me
        if mine and (mentioning is None or _mentions(entry, mentioning)):
            found.append(int(entry))
    return found


def _mentions(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
        with open(f"/proc/{pid}/stat", "rb") as stat:
            name = stat.read().split(b")", 1)[0]
    except OSError:
        return False
    return text.encode() in raw or (not raw and b"qemu" in name)


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not zombies) other than this one whose command line names `text`."""
    found, needle = [], text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if needle not in cmdline.read():
                    continue
        except OSError:
            continue
        fields = _stat_fields(entry)
        if fields and fields[0] != b"Z":
            found.append(int(entry))
    return found


def kill_and_reap(pids: list[int]) -> None:
    """SIGKILL, and reap those that are this process's children: a daemon run in the test's
    own process leaves its VMs as our children, which nobody else would reap (zombies)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def gone_within(pid: int, seconds: float, *, kill: bool = False) -> bool:
    """Whether `pid` has ended within `seconds` (its pidfd readable; nobody is reaped here).
    With `kill`, SIGKILL goes first, through the same pidfd: a recycled PID is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        readable, _, _ = select.select([pidfd], [], [], seconds)
        return bool(readable)
    finally:
        os.close(pidfd)


def console_keepers(folder: str) -> list[int]:
    """The live console keepers of VMs in `folder`: started alone, a keeper names its file
    there; forked by the keeper zygote, it has the zygote's command line and holds its file
    open."""
    found = []
    for pid in processes_mentioning("console_keeper.py"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "keeper-zygote":
                continue
            if folder in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") or any(
                os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder)
                for fd in os.listdir(f"/proc/{pid}/fd")
            ):
                found.append(pid)
    return found


def is_console_keeper(pid: int) -> bool:
    """A VM's console keeper, or the zygote that forks them."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"console_keeper" in cmdline.read()
    except OSError:
        return False
