"""A VM's console file read back and followed (its keeper is started with QEMU by
console_start.py).

QEMU's stdout and stderr go to pipes held by a keeper process of their own
(console_keeper.py), never by the daemon: a daemon SIGKILLed, stopped with its VMs left
running, or upgraded loses none of QEMU's lines, and the next one reads what was printed
before and while it was away, then follows. See docs/decisions.md, "The console survives
the daemon".

The file is read when the kernel says it changed (console_watch.py: one inotify watch on the
directory, whoever writes, root's QEMU behind sudo included), and by polling (a read at end
of file and a stat, every POLL_INTERVAL) where it cannot say. A gap in the sequence numbers
is told as one line, where the lines went missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cocos_manager.host import done_within
from cocos_manager.qemu import console_watch
from cocos_manager.qemu.output import clean_line

POLL_INTERVAL = 0.1
DRAIN_INTERVAL = 0.01
CHUNK = 256 * 1024
_STREAMS = {b"O": "stdout", b"E": "stderr"}

ConsoleSink = Callable[[str, str, int, bool], None]
"""(stream, text, timestamp_ns, live): live is False for lines printed before the daemon
took the VM over (its history: the console, not Events nor the daemon's log)."""


@dataclass(frozen=True, slots=True)
class ConsoleFiles:
    """Where one VM's console is kept, and the bound of its disk (both files together)."""

    path: Path
    max_bytes: int

    @property
    def rotated(self) -> Path:
        return self.path.with_name(self.path.name + ".1")


def dropped_note(count: int) -> str:
    return (
        f"cocos-manager: {count} console lines dropped "
        "(the console file is bounded by MANAGER_CONSOLE_FILE_BYTES)"
    )


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class RecordParser:
    """Records to lines: a line read before (a file read again after a rotation) is skipped,
    and a gap in the sequence numbers becomes one line saying how many were dropped."""

    def __init__(self, sink: ConsoleSink) -> None:
        self.sink = sink
        self.live = True
        self.ended = False  # the keeper's last record was read
        self.last_stamp: int | None = None  # of the last record read: its end, once `ended`
        self._next = 0  # the sequence number of the next line
        self._buf = b""

    def feed(self, data: bytes) -> None:
        records = (self._buf + data).split(b"\n")
        self._buf = records.pop()
        for record in records:
            self._record(record)

    def next_file(self) -> None:
        """What is left of a file read to its end is a torn record (a keeper killed while
        writing it): never joined to the next file's first."""
        self._buf = b""

    def _record(self, record: bytes) -> None:
        parts = record.split(b" ", 3)
        if len(parts) != 4:
            return  # not a record (a torn write): skipped
        seq_text, stamp_text, tag, payload = parts
        if tag == b"X":
            self.ended = True
            with contextlib.suppress(ValueError):
                self.last_stamp = int(stamp_text)
            return
        stream = _STREAMS.get(tag)
        if stream is None:
            return  # the version, or a record of a later format: not a line
        try:
            seq, stamp = int(seq_text), int(stamp_text)
        except ValueError:
            return
        if seq < self._next:
            return
        if seq > self._next:
            self.sink("stderr", dropped_note(seq - self._next), stamp, self.live)
        self._next = seq + 1
        self.last_stamp = stamp
        if text := clean_line(payload):
            self.sink(stream, text, stamp, self.live)


def read_history(files: ConsoleFiles, sink: ConsoleSink) -> int | None:
    """Everything the console files hold, oldest first (a VM whose QEMU ended while no
    daemon ran: its post-mortem). At most `files.max_bytes`, by the keeper's bound. Returns
    when QEMU ended as far as the file tells (ns since the epoch): the keeper's last record,
    written once both pipes closed; else (a keeper killed first) its last line; else None."""
    parser = RecordParser(sink)
    parser.live = False
    for path in (files.rotated, files.path):
        with contextlib.suppress(FileNotFoundError):
            parser.feed(path.read_bytes()[: files.max_bytes])
            parser.next_file()
    return parser.last_stamp


class ConsoleReader:
    """Reads a console file from its oldest line, then follows it across rotations until the
    keeper's last record (or close()). `history`: what is in the files when reading starts
    was printed before this daemon took the VM over."""

    def __init__(self, files: ConsoleFiles, sink: ConsoleSink, *, history: bool) -> None:
        self._files = files
        self._fds: list[int] = []  # oldest first; the last one is the file being written
        self._parser = RecordParser(sink)
        self._parser.live = not history
        self._interval = POLL_INTERVAL
        self._wake: asyncio.Future[None] | None = None
        self._watch: tuple[console_watch.DirectoryWatch, list[console_watch.Key]] | None = None
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.caught_up: asyncio.Future[None] = loop.create_future()  # all read that was there
        self._task = asyncio.ensure_future(self._run())

    async def drain(self, timeout: float) -> None:
        """Waits up to `timeout` for the keeper's last record (QEMU has ended): reading faster
        meanwhile, and at once when the kernel says the file changed. Never cancels the
        reading, so a later call still gets the rest."""
        self._interval = DRAIN_INTERVAL
        self._hurry(True)
        self.poke()
        try:
            await done_within(self.ended, timeout)
        finally:  # no last record (a keeper killed): polled as before, not 100 times a second
            self._interval = POLL_INTERVAL
            self._hurry(False)

    def _hurry(self, hurried: bool) -> None:
        if self._watch is not None:
            self._watch[0].hurry(self.poke, hurried)

    def poke(self) -> None:
        """Reads now: the keeper has ended, so its last record is in the file (a drain would
        otherwise find it at its next poll, up to DRAIN_INTERVAL later); also the inotify
        watch's wake-up. A poke while reading is not needed: the reading goes on to the end."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        self._close_fds()
        # As _run's end says them: a task cancelled before it first ran never gets there.
        for future in (self.ended, self.caught_up):
            if not future.done():
                future.set_result(None)

    @property
    def last_record_read(self) -> bool:
        """The keeper's last record was read: it ended because QEMU's output did."""
        return self._parser.ended

    # -- reading ---------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            self._watch = console_watch.watch((self._files.path, self._files.rotated), self.poke)
            self._open_files(skip=None)
            while True:
                if self._read_chunk():
                    await asyncio.sleep(0)  # a long history: let the loop breathe
                    continue
                if self._parser.ended:
                    return
                if self._advance():
                    continue
                self._parser.live = True  # caught up: from here on every line is new
                if not self.caught_up.done():
                    self.caught_up.set_result(None)
                await self._wait()
        finally:
            if self._watch is not None:
                self._watch[0].remove(self._watch[1], self.poke)
                self._watch = None
            self._close_fds()
            for future in (self.ended, self.caught_up):
                if not future.done():
                    future.set_result(None)

    async def _wait(self) -> None:
        """Until poked, or the next poll where the kernel does not tell (or a drain hurries).
        A future and a timer: asyncio.wait_for made a task per wait, most of the loop's CPU
        when every VM's console was polled."""
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        watched = self._watch is not None and self._watch[0].watching(self._watch[1])
        timer = None
        if not watched or self._interval != POLL_INTERVAL:
            timer = loop.call_later(self._interval, self.poke)
        try:
            await self._wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _open_files(self, skip: int | None) -> None:
        """FILE.1 then FILE, opened as one consistent pair (a rotation between the two opens
        is seen and retried); `skip`: the inode just read to its end (now FILE.1)."""
        for _ in range(5):
            old, new = _open(self._files.rotated), _open(self._files.path)
            fds = [fd for fd in (old, new) if fd is not None]
            if old is None or _inode(self._files.rotated) == os.fstat(old).st_ino:
                break
            for fd in fds:
                os.close(fd)
        if old is not None and os.fstat(old).st_ino == skip:
            os.close(old)
            fds.remove(old)
        self._fds = fds
        self._parser.next_file()

    def _advance(self) -> bool:
        """At the end of the file read: on to the next one, if there is one (a rotation)."""
        if len(self._fds) > 1:
            os.close(self._fds.pop(0))
            self._parser.next_file()
            return True
        current = self._fds[0] if self._fds else None
        inode = _inode(self._files.path)
        if inode is None:
            return False  # between the keeper's rename and its new file, or removed
        if current is not None and inode == os.fstat(current).st_ino:
            return False
        if self._read_chunk():  # written just before the rotation, after the read at its end
            return True
        skip = os.fstat(current).st_ino if current is not None else None
        self._close_fds()
        self._open_files(skip)
        return True

    def _read_chunk(self) -> bool:
        if not self._fds:
            return False
        data = os.read(self._fds[0], CHUNK)
        if not data:
            return False
        self._parser.feed(data)
        return True

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
