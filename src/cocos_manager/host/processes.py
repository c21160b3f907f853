"""Processes as /proc shows them: a PID's start time and command line, which together tell a
process apart from a later one that reuses its PID (a record names its QEMU by both), and
the processes started since a given moment, for finding a VM's QEMU by its command line."""

from __future__ import annotations

import os
from collections.abc import Iterator

_PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread
_PF_EXITING = 0x00000004  # /proc/PID/stat flags: in exit (its memory, and command line, gone)


def _stat_fields(pid: int | str) -> list[bytes]:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses):
    [0] the state, [6] the flags, [19] the start time. OSError when gone or hidden."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()


def process_start_time(pid: int) -> int:
    """Clock ticks since boot when `pid` started (0 if gone); exec does not change it."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return 0


def process_ended(pid: int) -> bool:
    """Gone, or exited and not yet reaped (a zombie, or dying): nothing left to signal."""
    try:
        return _stat_fields(pid)[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def live_processes(since: int = 0, naming: str = "") -> Iterator[tuple[int, int, list[str]]]:
    """(pid, start time, argv) of each live process this user may see that started at or after
    `since` (clock ticks since boot): the start time first, the command line only of those that
    pass. For finding a VM's QEMU by its command line; it reads all of /proc, so off the loop.

    `naming`: only processes whose command line contains it, read first; the rest of the host's
    processes cost one read each instead of two files opened and the whole line decoded (the
    start-up sweep looks for the few QEMUs naming its directory among all of them)."""
    needle = os.fsencode(naming)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (since and process_start_time(int(entry)) < since):
            continue
        if needle and needle not in _raw_cmdline(entry):
            continue
        try:
            identity = process_identity(int(entry))
        except OSError:  # hidden from this user (/proc's hidepid): nothing we may act on
            continue
        if identity is not None and identity[0] >= since:
            yield int(entry), identity[0], identity[1]


def _raw_cmdline(pid: str) -> bytes:
    """/proc/PID/cmdline as it is, b"" when it cannot be read (gone, hidden from this user)."""
    try:
        return _read_cmdline(pid)
    except OSError:
        return b""


def _read_cmdline(pid: int | str) -> bytes:
    """/proc/PID/cmdline whole (b"" for a kernel thread or a process mid-exec or in exit): the
    one reader of it here. OSError when gone or hidden."""
    fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def processes_since(since: int) -> Iterator[tuple[int, list[str] | None]]:
    """(pid, argv) of each process this user may see that started at or after `since`, each
    read once; argv None for one mid-exec: no command line yet, between exec's swap of its
    memory and its setting up of the arguments (a parent's `Popen`, or sudo, may already have
    seen that exec succeed). One look per process, not a walk for the command lines and
    another for those mid-exec: a process read mid-exec by the first and done by the second
    would be in neither. Kernel threads (never a command line), zombies and processes in exit
    (whose memory is gone first: a large one takes seconds) are not mid-exec."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
            if int(fields[19]) < since:
                continue
            raw = _read_cmdline(entry)
            flags = int(fields[6])
        except (OSError, IndexError, ValueError):  # gone, or hidden (hidepid)
            continue
        if raw and fields[0] != b"Z":
            yield int(entry), _argv(raw)
        elif not raw and fields[0] not in (b"Z", b"X") and not flags & (_PF_KTHREAD | _PF_EXITING):
            yield int(entry), None


def process_identity(pid: int) -> tuple[int, list[str]] | None:
    """(start time in clock ticks since boot, argv) of a live process; None if gone or a zombie."""
    try:
        fields = _stat_fields(pid)
        raw = _read_cmdline(pid)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == b"Z" or not raw:
        return None
    return int(fields[19]), _argv(raw)


def _argv(raw: bytes) -> list[str]:
    return [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]
