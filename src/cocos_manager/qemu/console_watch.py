"""Wake-ups for console readers when their files change, from one inotify watch per directory.

Polling every VM's console file cost the loop a task, a timer, a read and a stat per VM ten
times a second: 10-12 % of a CPU with 200 idle VMs (make bench, fleet). The kernel tells
instead: every VM's console is in the same directory, so one watch on it (writes, creations
and renames: a keeper's appends and its rotations) and one descriptor for the daemon, whose
events are handed to the reader of the file they name. The stdlib has no inotify, so it is
called through ctypes, loaded at the first VM's watch (not at the daemon's start-up: about
14 ms and 1 MiB, tests/telemetry/test_startup_imports.py); where it cannot be had (no inotify, its limits reached, a directory it
cannot watch) `watch` says so and the reader polls as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = IN_MODIFY | IN_MOVED_TO | IN_CREATE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ = 64 * 1024
# Wake-ups are gathered this long: a guest flooding its console wakes its reader at most 100
# times a second (each read takes all that is there), as the poll's drain did.
GATHER = 0.01

Wake = Callable[[], None]
Key = tuple[int, bytes]  # watch descriptor, file name


@functools.cache
def _libc() -> Any:
    """libc with the three inotify calls typed, or None."""
    import ctypes  # lazy: see the module docstring

    try:  # the daemon's own symbols, libc's among them (find_library would run ldconfig)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


# One thread, kept: a thread started per close held the loop until it ran (Thread.start waits
# for it), between a SIGKILLed QEMU's last console line and its `vm-exit`: 0.20 ms median, up
# to 4.7 ms on a loaded host; handed to this one, 0.07 ms, at most 0.28 (make bench, crash).
_closer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inotify-close")


def close_aside(fd: int) -> None:
    """Closes an inotify descriptor in another thread: the kernel waits for an RCU grace
    period when an inotify instance goes (10-20 ms here), which on the loop held up whatever
    came next: the last VM's `vm-exit` after a SIGKILL waited for it (make bench, crash)."""
    try:
        _closer.submit(_close, fd)
    except RuntimeError:  # the interpreter is shutting down: no thread to hand it to
        _close(fd)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class DirectoryWatch:
    """One loop's inotify descriptor: the directories watched, the readers to wake by file
    name. Closed when its last reader lets go (tests run many loops in one process)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._wds: dict[bytes, int] = {}  # directory -> watch descriptor
        self._wakes: dict[tuple[int, bytes], set[Wake]] = {}  # (wd, file name) -> readers
        self._woken: set[Wake] = set()  # to wake at the end of the gathering
        self._hurried: set[Wake] = set()  # woken at once: readers draining an ended QEMU
        self._gathering: asyncio.TimerHandle | None = None
        loop.add_reader(fd, self._read)

    def add(self, paths: tuple[Path, ...], wake: Wake) -> list[Key] | None:
        libc = _libc()
        keys = []
        for path in paths:
            # Asked again for each reader, not kept by name: a directory renamed away (or
            # mounted over) and made again is another inode, whose watch is another one (the
            # same inode's is given back as it is). A reader of the old one then polls.
            directory = os.fsencode(path.parent)
            wd = libc.inotify_add_watch(self._fd, directory, MASK)
            if wd < 0:
                return None
            self._wds[directory] = wd
            keys.append((wd, os.fsencode(path.name)))
        for key in keys:
            self._wakes.setdefault(key, set()).add(wake)
        return keys

    def watching(self, keys: list[Key]) -> bool:
        """False once a directory's watch is gone (the directory removed or its file system
        unmounted): its readers must poll."""
        live = self._wds.values()
        return self._fd >= 0 and all(wd in live for wd, _ in keys)

    def hurry(self, wake: Wake, hurried: bool) -> None:
        """While `hurried`, `wake` is called as soon as its file changes, not at the end of the
        gathering: its QEMU has ended and `vm-exit` waits for the keeper's last record (a
        drain), which otherwise waited for the drain's next poll or the keeper's end."""
        if hurried:
            self._hurried.add(wake)
        else:
            self._hurried.discard(wake)

    def remove(self, keys: list[Key], wake: Wake) -> None:
        self._hurried.discard(wake)
        for key in keys:
            wakes = self._wakes.get(key)
            if wakes is not None:
                wakes.discard(wake)
                if not wakes:
                    del self._wakes[key]
        if not self._wakes:
            self.close()

    def close(self) -> None:
        if _watches.get(self._loop) is self:
            del _watches[self._loop]
        with contextlib.suppress(ValueError, RuntimeError):  # fd gone, or the loop closed
            self._loop.remove_reader(self._fd)
        if self._fd >= 0:
            close_aside(self._fd)
        self._fd = -1
        if self._gathering is not None:
            self._gathering.cancel()

    def _read(self) -> None:
        try:
            data = os.read(self._fd, _READ)
        except BlockingIOError:
            return
        woken = self._woken
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:  # events were lost: every reader reads
                woken.update(*self._wakes.values())
                continue
            if mask & IN_IGNORED:  # the directory is gone: its readers poll from here on
                self._wds = {d: w for d, w in self._wds.items() if w != wd}
                woken.update(*(w for (kwd, _), w in self._wakes.items() if kwd == wd))
                continue
            woken.update(self._wakes.get((wd, name), ()))
        if now := woken & self._hurried:
            woken -= now
            for wake in now:
                wake()
        if woken and self._gathering is None:
            self._gathering = self._loop.call_later(GATHER, self._wake)

    def _wake(self) -> None:
        self._gathering = None
        woken, self._woken = self._woken, set()
        for wake in woken:
            wake()


_watches: dict[asyncio.AbstractEventLoop, DirectoryWatch] = {}


def watch(paths: tuple[Path, ...], wake: Wake) -> tuple[DirectoryWatch, list[Key]] | None:
    """Calls `wake` (on the running loop) whenever one of `paths` is written, created or
    renamed into place, until `remove(keys, wake)`; None if the kernel cannot tell, and the
    caller must poll."""
    libc = _libc()
    if libc is None:
        return None
    loop = asyncio.get_running_loop()
    watcher = _watches.get(loop)
    if watcher is None:
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        watcher = _watches[loop] = DirectoryWatch(loop, fd)
    keys = watcher.add(paths, wake)
    if keys is None:
        if not watcher._wakes:
            watcher.close()
        return None
    return watcher, keys
