"""Processes as /proc shows them: a PID's start time and command line, which together tell a
process apart from a later one that reuses its PID (a record names its QEMU by both), and
the processes started since a given moment, for finding a VM's QEMU by its command line."""

from __future__ import annotations

import os
from collections.abc import Iterator

_PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread


def process_start_time(pid: int) -> int:
    """Clock ticks since boot when `pid` started (0 if gone); exec does not change it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


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
        fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return b""
    finally:
        os.close(fd)
    return b"".join(chunks)


def mid_exec(since: int) -> list[int]:
    """Processes started at or after `since` that have no command line yet: between exec's
    swap of their memory and its setting up of their arguments. A parent's `Popen`, or sudo,
    may already have seen such an exec succeed; it shows its command line a moment later.
    Kernel threads, which never have one, are left out."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or process_start_time(int(entry)) < since:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                fields = stat_file.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                raw = cmdline.read()
        except (OSError, IndexError):
            continue
        if not raw and fields[0] not in (b"Z", b"X") and not int(fields[6]) & _PF_KTHREAD:
            found.append(int(entry))
    return found


def process_identity(pid: int) -> tuple[int, list[str]] | None:
    """(start time in clock ticks since boot, argv) of a live process; None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == b"Z" or not raw:
        return None
    argv = [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]
    return int(fields[19]), argv
