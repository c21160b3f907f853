"""One daemon per state directory: an exclusive lock taken before anything else.

Without it a second `cocos-manager` started with the same settings (a stray manual start, a
second unit with the same environment file) would run recovery over the first one's records:
kill its starting VMs, adopt its running ones (and stop them when it exits) and delete their
files. With it, the second one stops at once with a line naming the directory and the PID of
the daemon that holds it, and touches nothing.

The lock is flock(2) on MANAGER_STATE_DIR/manager.lock, which also holds the holder's PID for
that message. The kernel drops the lock when the holder's descriptor closes, so a daemon that
crashed or was SIGKILLed never leaves a stale lock behind (a PID file alone would). The
descriptor is close-on-exec, so QEMU children do not inherit it: a VM left running by a dead
daemon must not keep the next daemon from starting and adopting it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from cocos_manager.config import Settings
from cocos_manager.telemetry import get_logger

LOCK_NAME = "manager.lock"

_log = get_logger()
_HELD: set[Path] = set()  # directories this process holds the lock of


class StateDirLockedError(Exception):
    """Another process holds the state directory; the message is the operator's one line."""


class StateLock:
    """The lock on one state directory; acquire() raises StateDirLockedError if it is held."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(os.path.abspath(state_dir))
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StateLock:
        if self._fd is not None:
            return self
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise StateDirLockedError(
                f"MANAGER_STATE_DIR: cannot lock {str(self.directory)!r}: {error.strerror or error}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirLockedError(
                    f"MANAGER_STATE_DIR: cannot lock {str(self.directory)!r}: {error.strerror}"
                ) from None
            raise StateDirLockedError(_in_use(self.directory, holder)) from None
        self._fd = fd
        _HELD.add(self.directory)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as error:  # e.g. no space left: the lock is held all the same
            _log.warning(
                "cannot write this daemon's PID into the state lock file",
                path=str(self.path),
                error=error.strerror,
            )
        return self

    def release(self) -> None:
        """Unlocks; the file stays (removing it would race with a daemon opening it)."""
        fd, self._fd = self._fd, None
        _HELD.discard(self.directory)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _in_use(directory: Path, holder: int | None) -> str:
    who = f"PID {holder}" if holder else "a process that has not written its PID yet"
    return (
        f"MANAGER_STATE_DIR: {str(directory)!r} is in use by another cocos-manager ({who}); "
        "one daemon per state directory"
    )


def probe_state_lock(state_dir: str | os.PathLike[str]) -> None:
    """StateDirLockedError, with the line the daemon would refuse to start with, when another
    process holds the lock; for `cocos-manager check`. Writes nothing: a check run by another
    user must not leave a lock file the daemon cannot open."""
    directory = Path(os.path.abspath(state_dir))
    if directory in _HELD:  # the daemon's own start-up: the lock is its own
        return
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: nobody holds it (a directory it cannot make is checked apart)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_pid(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirLockedError(_in_use(directory, holder)) from None
    finally:
        os.close(fd)  # releases the lock if it was taken


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def hold_state_lock(settings: Settings) -> StateLock:
    """Locks MANAGER_STATE_DIR for the rest of this process's life (the kernel releases it at
    exit, however the process ends) and logs where state and per-VM files are kept."""
    lock = StateLock(settings.service.STATE_DIR).acquire()
    _log.info(
        "state directory locked",
        state_dir=str(lock.directory),
        tmp_file_loc=settings.qemu.TMP_FILE_LOC,
        pid=os.getpid(),
    )
    return lock
