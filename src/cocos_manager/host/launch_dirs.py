"""Every MANAGER_QEMU_TMP_FILE_LOC this state directory's daemon has launched VMs in, kept in
`MANAGER_STATE_DIR/launch-dirs` (a JSON list of absolute paths).

A VM whose record is lost is found by the per-VM file names its QEMU's command line gives
under the directory it was launched in (vm/orphans.py). A record names its directory, but a
lost record names nothing: after the setting changed, the daemon would look only in the new
directory, and the VM's QEMU would run on, nobody's. So each directory is written here,
durably, before the first VM is launched in it, and stays until nothing of the daemon's is
left there. The state directory is the daemon's own and private (StateStore.open), like the
records, which decide as much.

The other way round, each launch directory says which state directories have launched VMs in
it: an extended attribute per state directory on the directory itself (no file is added to
it), `user.cocos-manager.state-dir.<hash of the path>` = the state directory's path, set
durably before the first VM is launched there. A daemon sweeping a directory for its lost
records' QEMUs cannot tell them from another daemon's VMs (which have no record here): while
another state directory that still exists is named, it leaves the directory to that daemon.
One attribute per state directory rather than one list: two daemons marking a directory at
once each set their own, so neither mark can be lost to a read-modify-write race.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

from cocos_manager.telemetry import get_logger

FILE_NAME = "launch-dirs"
_MAX_BYTES = 1 << 20
_MARK = "user.cocos-manager.state-dir."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_log = get_logger()


def load_launch_dirs(state_dir: Path) -> list[str]:
    """The directories listed; [] when there is no list yet. A list that does not parse is
    logged and replaced at the next save (what it named is then looked for no more)."""
    path = state_dir / FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            doc = json.loads(file.read(_MAX_BYTES + 1))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        _log.error(
            "list of former MANAGER_QEMU_TMP_FILE_LOC directories unreadable: replaced",
            path=str(path),
            error=getattr(error, "strerror", None) or str(error),
        )
        return []
    if not isinstance(doc, list) or not all(isinstance(d, str) for d in doc):
        _log.error("list of former MANAGER_QEMU_TMP_FILE_LOC directories not a list of paths: "
                   "replaced", path=str(path))  # fmt: skip
        return []
    return list(dict.fromkeys(doc))


def save_launch_dirs(state_dir: Path, dirs: list[str]) -> None:
    """Written whole under a temporary name, made durable, renamed over the list, and the
    directory made durable: a crash leaves the old list or the new one. Blocking (two
    fsyncs): off the loop, and only when the list changes (a change of the setting)."""
    path = state_dir / FILE_NAME
    temporary = state_dir / f".{FILE_NAME}.tmp"
    data = json.dumps(dirs, indent=1).encode() + b"\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    os.close(fd)
    os.replace(temporary, path)
    directory = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _own(state_dir: Path) -> str:
    return os.path.realpath(state_dir)


def _mark_name(own: str) -> str:
    return _MARK + hashlib.sha256(own.encode()).hexdigest()[:16]


def mark_launch_dir(where: Path | str, state_dir: Path) -> None:
    """Names `state_dir` on the directory `where`, durably (the directory fsynced), unless
    it is named already. Blocking; raises OSError (ENOTSUP where the file system takes no
    user extended attributes)."""
    own = _own(state_dir)
    name = _mark_name(own)
    fd = os.open(where, _DIR_FLAGS)
    try:
        try:
            if os.getxattr(fd, name) == own.encode():
                return
        except OSError as error:
            if error.errno != errno.ENODATA:
                raise
        os.setxattr(fd, name, own.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def unmark_launch_dir(where: Path | str, state_dir: Path) -> None:
    """Takes `state_dir`'s name off `where` (nothing of its daemon is left there), if it can."""
    with contextlib.suppress(OSError):
        fd = os.open(where, _DIR_FLAGS)
        try:
            os.removexattr(fd, _mark_name(_own(state_dir)))
        finally:
            os.close(fd)


def launch_dir_sharers(where: Path | str, state_dir: Path) -> list[str]:
    """The state directories besides `state_dir` named on `where`. One that cannot be
    looked at (say under another user's private directory) or is not found counts: a state
    directory not found may be on a file system not mounted now, or in another mount
    namespace, while its daemon's VMs run on (docs/decisions.md, "Restarts:
    a lost record"). Blocking; raises OSError (ENOTSUP where unsupported)."""
    fd = os.open(where, _DIR_FLAGS)
    try:
        values = []
        for name in os.listxattr(fd):
            if name.startswith(_MARK):
                try:
                    values.append(os.getxattr(fd, name).decode(errors="replace"))
                except OSError as error:
                    if error.errno != errno.ENODATA:  # else removed meanwhile
                        raise
    finally:
        os.close(fd)
    own = os.stat(state_dir)
    others = []
    for value in values:
        try:
            info = os.stat(value)
        except (FileNotFoundError, NotADirectoryError):
            others.append(
                f"{value} (not found; if it is gone for good: setfattr -x {_mark_name(value)} {where})"
            )
            continue
        except OSError:
            others.append(value)
            continue
        if (info.st_dev, info.st_ino) != (own.st_dev, own.st_ino):
            others.append(value)
    return sorted(set(others))
