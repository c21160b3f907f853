"""Starting a QEMU process, signalling it, and how one ended.

Kept apart from qemu/process.py (which supervises the process once it exists) because starting
is the part that runs in a worker thread: Popen waits until the child has exec'd. Signals go
through pidfds, so a PID that ended and was reused is never hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from cocos_manager.host import process_start_time
from cocos_manager.qemu.failures import launch_failure


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How QEMU ended; returncode is None for an adopted process (not our child)."""

    returncode: int | None

    @property
    def signal(self) -> int | None:
        if self.returncode is not None and self.returncode < 0:
            return -self.returncode
        return None

    def describe(self) -> str:
        if self.returncode is None:
            return "exited (status unknown: not a child of this daemon)"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            return f"killed by signal {name}"
        return f"exit status {self.returncode}"


def spawn(
    argv: list[str],
    qmp_fd: int,
    env: dict[str, str] | None,
    *,
    stdout: int = subprocess.PIPE,
    stderr: int = subprocess.PIPE,
) -> tuple[subprocess.Popen[bytes], int]:
    """In a worker thread. Popen (vfork+exec) rather than asyncio's subprocess: exits are
    watched through a pidfd for children and adopted processes alike. `stdout`, `stderr`:
    pipes to the daemon, or to the VM's console keeper (console_file.py)."""
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(qmp_fd,),
            start_new_session=True,  # a Ctrl-C or a daemon crash does not take the VMs along
            env=env,
        )
    except OSError as error:  # QEMU or sudo gone or not executable since start-up
        raise launch_failure(argv, error) from None
    return popen, process_start_time(popen.pid)


def kill_spawned(popen: subprocess.Popen[bytes]) -> None:
    popen.kill()
    popen.wait()
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()


def signal_pidfd(pidfd: int | None, sig: int) -> bool:
    """True when delivered (or the process is gone); False when not permitted (EPERM: a
    process of another user, such as root's QEMU behind sudo)."""
    if pidfd is None:
        return True
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return True


def kill_pids(pids: Sequence[int]) -> bool:
    """SIGKILL through pidfds (a PID that ended and was reused is never hit)."""
    delivered = True
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            delivered = signal_pidfd(pidfd, signal.SIGKILL) and delivered
        finally:
            os.close(pidfd)
    return delivered
