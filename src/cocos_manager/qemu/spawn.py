"""Starting a QEMU process, and how one ended.

Kept apart from qemu/process.py (which supervises the process once it exists) because this is
the part that runs in a worker thread: Popen waits until the child has exec'd.
"""

from __future__ import annotations

import signal
import subprocess
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
