"""After a restart, what no record accounts for: a QEMU or per-VM files in
MANAGER_QEMU_TMP_FILE_LOC whose record is lost (set aside as `.bad`, emptied by a power cut
before it was durable, deleted by hand). See docs/decisions.md, "Restarts: a lost record".

Every per-VM file name, and the command line of every QEMU the daemon starts, names the VM's
UUID under TMP_FILE_LOC (`bzImage-UUID`, `qmp-UUID.sock`, ...). Once the records are
recovered, a live process whose command line names such a file of a UUID no record holds is
a QEMU of ours that nobody tracks: it is ended (its computation cannot be resumed: its id,
TTL and numbers were in the record) and an error line names it; files of such UUIDs are
removed. Only by a daemon alone on TMP_FILE_LOC (`hold_tmp_dir`): two daemons with separate state
directories may share one TMP_FILE_LOC, and each other's VMs have no record in the other's
directory. Alone now is not enough: the other daemon may be down for a moment (a restart, its
VMs left running), so a directory another state directory has launched VMs in (it says so,
host/launch_dirs.py) is left to that daemon, with a warning (`_shared`).

The same is done in every directory the setting named before (`sweep_former`): the daemon
lists each one in its state directory before it launches a VM there (host/launch_dirs.py),
so a lost record of a VM launched before the setting changed does not leave its QEMU
running, nobody's. A former directory is swept only while no daemon holds it, no other state
directory has launched VMs in it, and it is still as the daemon made it: a real directory,
the daemon's own, mode 0700 (`_former_problem`; a planted `/` or `/etc` in the list is never
swept). It is dropped from the list once nothing of the daemon's is left there, or once it
can never qualify (a relative path, a symlink, not a directory).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import re
import stat
import time
from pathlib import Path

from cocos_manager.errors import QemuStopFailedError
from cocos_manager.host import (
    launch_dir_sharers,
    live_processes,
    load_launch_dirs,
    mark_launch_dir,
    save_launch_dirs,
    unmark_launch_dir,
)
from cocos_manager.qemu import QemuProcess
from cocos_manager.telemetry import get_logger
from cocos_manager.vm.files import remove_shares

_log = get_logger()
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# The per-VM file names (qemu/argv.py vm_file_paths, vm/files.py vm_paths).
_NAME = rf"(?:bzImage-|rootfs\.cpio-|OVMF_VARS-|agent-config-|qmp-)({_UUID})(?:\.gz|\.fd|\.json|\.sock)?"
# Files and directories of a VM that QEMU's command line does not name: its console file (the
# keeper's, vm/files.py) and a CreateVm'd VM's shares.
_UNNAMED = rf"console-({_UUID})\.log(?:\.1)?|shares-({_UUID})"


def hold_tmp_dir(tmp: Path) -> tuple[int | None, bool]:
    """A `flock` on TMP_FILE_LOC itself (no file added to it), kept until the daemon exits
    (close-on-exec: no QEMU inherits it), and whether this daemon is alone on it. Every
    daemon holds it shared for its lifetime; one that can take it exclusively at start has
    no other daemon beside it and may sweep (holding it exclusively meanwhile, then shared:
    `share_tmp_dir`). A daemon that cannot even take it shared within a few seconds (another
    is sweeping for that long) goes on without it: (None, False). The directory is made now
    if missing, so that it is held from the start."""
    try:
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        _log.warning(
            "MANAGER_QEMU_TMP_FILE_LOC cannot be opened at start: QEMUs and per-VM files "
            "there that no VM record names are not looked for",
            tmp_file_loc=str(tmp),
            error=error.strerror,
        )
        return None, True  # nothing to sweep there, and no other daemon to warn of
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, True
    except OSError:
        pass
    for _ in range(100):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd, False
        except OSError:
            time.sleep(0.1)
    os.close(fd)
    return None, False


def share_tmp_dir(fd: int) -> None:
    """After the sweep: the exclusive hold becomes shared, so other daemons may start beside
    this one (and, seeing it, never sweep its VMs)."""
    fcntl.flock(fd, fcntl.LOCK_SH)


def _named_uuids(tmp: str, argv: list[str]) -> set[str]:
    """The UUIDs of which the command line names two per-VM files or more (a QEMU names its
    kernel and its rootfs at least; a `less` of one file is not a QEMU)."""
    pattern = re.compile(rf"(?:^|[=,])({re.escape(tmp)}/{_NAME})(?:$|,)")
    files: dict[str, set[str]] = {}
    for arg in argv:
        for path, vm_uuid in pattern.findall(arg):
            files.setdefault(vm_uuid, set()).add(path)
    return {vm_uuid for vm_uuid, paths in files.items() if len(paths) >= 2}


def _found(tmp: str, known: set[str]) -> dict[str, list[tuple[int, int, list[str]]]]:
    """UUID -> (pid, start time, argv) of the live processes naming its files; sudo's
    child QEMU is left to its sudo (ended through it, as QemuProcess does)."""
    by_uuid: dict[str, list[tuple[int, int, list[str]]]] = {}
    for pid, start_time, argv in live_processes(naming=f"{tmp}/"):
        for vm_uuid in _named_uuids(tmp, argv) - known:
            by_uuid.setdefault(vm_uuid, []).append((pid, start_time, argv))
    for found in by_uuid.values():
        if any(os.path.basename(argv[0]) == "sudo" for _, _, argv in found):
            found[:] = [f for f in found if os.path.basename(f[2][0]) == "sudo"]
    return by_uuid


def _option(argv: list[str], pattern: str) -> str:
    for arg in argv:
        if match := re.search(pattern, arg):
            return match.group(1)
    return ""


async def sweep(tmp: Path, known: set[str]) -> bool:
    """Ends the QEMUs and removes the files under `tmp` of UUIDs not in `known`; False when a
    QEMU could not be ended (the next start looks again)."""
    where = str(tmp)
    found = await asyncio.to_thread(_found, where, known)
    ended = True
    for vm_uuid, processes in sorted(found.items()):
        for pid, start_time, argv in processes:
            ended = await _end(vm_uuid, pid, start_time, argv) and ended
    try:
        names = os.listdir(tmp)
    except OSError:
        return ended
    for name in sorted(names):
        match = re.fullmatch(_NAME, name) or re.fullmatch(_UNNAMED, name)
        if match is None:
            continue
        vm_uuid = next(group for group in match.groups() if group)
        if vm_uuid in known:
            continue
        if name.startswith("shares-"):
            remove_shares(tmp / name)  # never follows a symlink in its place
            continue
        try:
            os.unlink(tmp / name)
        except FileNotFoundError:
            continue
        except OSError as error:
            _log.warning("cannot remove a per-VM file", path=str(tmp / name), error=error.strerror)
            continue
        _log.warning(
            "per-VM file of no VM record removed (its record was lost)",
            path=str(tmp / name),
            uuid=vm_uuid,
        )
    return ended


def _hold_alone(where: str) -> int | None:
    """An exclusive flock on a former launch directory (as hold_tmp_dir takes the current one),
    or None when another daemon holds it: then its VMs may be there, with no record here."""
    try:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _former_problem(where: str) -> tuple[str, bool] | None:
    """None when the directory is gone; else why it may not be swept ("" when it may) and
    whether it never can be (then it is dropped from the list). The daemon made it a real
    directory of its own, mode 0700 (check_tmp_dir): anything else is not swept."""
    if not os.path.isabs(where) or os.path.normpath(where) != where:
        return f"{where!r} is not an absolute, normalised path", True
    try:
        info = os.lstat(where)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        return f"{where!r}: {error.strerror}", False
    if stat.S_ISLNK(info.st_mode):
        return f"{where!r} is a symlink", True
    if not stat.S_ISDIR(info.st_mode):
        return f"{where!r} is not a directory", True
    if info.st_uid != os.geteuid():
        return (
            f"{where!r} is owned by uid {info.st_uid}, not by the daemon's uid {os.geteuid()}",
            False,
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        return f"{where!r} has mode {stat.S_IMODE(info.st_mode):04o}, not 0700", False
    return "", False


async def _shared(state_dir: Path, where: str) -> list[str] | None:
    """The other state directories, still there, that launched VMs in `where` (the warning
    said); None when the directory cannot say (ENOTSUP: no user extended attributes)."""
    try:
        others = await asyncio.to_thread(launch_dir_sharers, where, state_dir)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        others = [f"(cannot be read: {error.strerror})"]
    if others:
        _log.warning(
            "MANAGER_QEMU_TMP_FILE_LOC not swept: another state directory (another "
            "cocos-manager's) has launched VMs there, which have no record here; that daemon "
            "looks for its own lost records' QEMUs and files there",
            launch_dir=where,
            other_state_dirs=others,
        )
    return others


async def sweep_current(state_dir: Path, tmp: Path, known: set[str]) -> None:
    """`sweep` of the current directory, unless another state directory has launched VMs
    there. Where the directory cannot say (no extended attributes), swept as before: the
    flock (`hold_tmp_dir`) alone tells whether another daemon is there."""
    if not await _shared(state_dir, str(tmp)):
        await sweep(tmp, known)


async def _mark(state_dir: Path, current: str) -> None:
    try:
        await asyncio.to_thread(mark_launch_dir, current, state_dir)
    except OSError as error:
        unsupported = error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
        (_log.warning if unsupported else _log.error)(
            "MANAGER_QEMU_TMP_FILE_LOC cannot be marked as used by this state directory: "
            "another cocos-manager sharing it, started while this one is down, may end this "
            "one's VMs there as lost records'",
            tmp_file_loc=current,
            error=error.strerror,
        )


async def sweep_former(state_dir: Path, current: str, recorded: set[str], known: set[str]) -> None:
    """Sweeps each directory the list names besides `current` (swept, or not, by the caller)
    as `sweep` does the current one, then saves the list: `current` added (and marked with
    the state directory) before any VM is launched there, a former one dropped once it is
    gone, can never be swept, or was swept whole and is named by no record (`recorded`: the
    launch directories of the records kept)."""
    await _mark(state_dir, current)
    listed = await asyncio.to_thread(load_launch_dirs, state_dir)
    keep = [current]
    unsupported: list[str] = []
    # A record's directory is one too (a record written before the list was kept).
    for where in [*listed, *sorted(recorded - set(listed))]:
        if where in keep or not where:
            continue
        problem = _former_problem(where)
        if problem is None:
            continue  # removed: nothing of ours can be there any more
        if problem[0]:
            _log.error(
                "former MANAGER_QEMU_TMP_FILE_LOC not swept: it is not one the daemon may use "
                f"({problem[0]}); QEMUs and files there of lost VM records are not looked for"
                + ("; dropped from the list" if problem[1] else ""),
                launch_dir=where,
            )
            if not problem[1]:
                keep.append(where)
            continue
        others = await _shared(state_dir, where)
        if others is None or others:
            if others is None:
                unsupported.append(where)
            keep.append(where)
            continue
        fd = _hold_alone(where)
        if fd is None:
            _log.warning(
                "former MANAGER_QEMU_TMP_FILE_LOC not swept: another process (another "
                "cocos-manager?) holds it; QEMUs and files there of lost VM records are not "
                "looked for",
                launch_dir=where,
            )
            keep.append(where)
            continue
        try:
            ended = await sweep(Path(where), known)
        finally:
            os.close(fd)
        if not ended or where in recorded:
            keep.append(where)
        else:
            await asyncio.to_thread(unmark_launch_dir, where, state_dir)
    if unsupported:
        _log.warning(
            "former MANAGER_QEMU_TMP_FILE_LOC directories not swept: their file system takes "
            "no extended attributes, so they cannot say whether another cocos-manager has "
            "launched VMs there; QEMUs and files there of lost VM records are not looked for",
            launch_dirs=unsupported,
        )
    if keep != listed:
        try:
            await asyncio.to_thread(save_launch_dirs, state_dir, keep)
        except OSError as error:
            _log.error(
                "cannot save the list of MANAGER_QEMU_TMP_FILE_LOC directories: a VM whose "
                "record is lost after the setting changes would not be found",
                path=str(state_dir),
                error=error.strerror,
            )


async def _end(vm_uuid: str, pid: int, start_time: int, argv: list[str]) -> bool:
    details = {
        "uuid": vm_uuid,
        "pid": pid,
        "agent_port": _option(argv, r"hostfwd=tcp:[^:]*:(\d+)-"),
        "vnc_display": _option(argv, r"^:(\d+)$") if "-vnc" in argv else "",
    }
    try:
        process = QemuProcess.adopt(pid, argv, start_time, argv)
    except ProcessLookupError:
        return True  # ended meanwhile
    process.kill_now()
    try:
        await process.terminate(0)
    except QemuStopFailedError as error:
        _log.error(
            "QEMU of a lost VM record could not be ended: end it by hand",
            error=str(error),
            **details,
        )
        return False
    _log.error(
        "QEMU of a lost VM record ended: no record named it (set aside as .bad, or lost), so "
        "its computation could not be resumed; its files are removed",
        **details,
    )
    return True
