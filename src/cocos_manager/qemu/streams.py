"""One QEMU process's output: its pipes to the daemon, or the file its console keeper writes
(console_file.py), as lines to the VM's callback; the last few kept for a failed start's
message. Owned by the QemuProcess (its `output`), which keeps to starting and stopping.

A keeper that ends while QEMU runs (killed, OOM) takes the console with it: QEMU's further
output goes nowhere. Its end is watched (one this daemon started: its pidfd; an adopted VM's:
found by its command line or the file it holds, then its pidfd) and, unless its last record says QEMU's output ended,
told once through `on_keeper_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections import deque
from collections.abc import Callable
from typing import Any

from cocos_manager.host import done_within, live_processes
from cocos_manager.qemu import console_keeper
from cocos_manager.qemu.console_file import ConsoleFiles, ConsoleReader
from cocos_manager.qemu.keeper_zygote import ANSWER_TIMEOUT
from cocos_manager.qemu.output import LineReader

LineCallback = Callable[[str, str], None]
HistoryCallback = Callable[[str, str, int], None]
TAIL_LINES = 20
# A keeper's end once QEMU's has come: at once (its pipes end with QEMU), or once it has
# started: a zygote that stopped answering is given its whole answer timeout before the keeper
# is started alone (an interpreter: 0.2 s typically), and a start that failed meanwhile must
# still get QEMU's words, which reach the daemon through that keeper.
KEEPER_END_WAIT = ANSWER_TIMEOUT + 2.0
LAST_RECORD_WAIT = 2.0
"""How long a keeper's end waits for its last record to be read (the file is polled every
100 ms) before it counts as a loss."""


def find_keeper(files: ConsoleFiles, since: int) -> int | None:
    """The PID of the keeper writing `files` (an adopted VM's: not this daemon's child); None
    when it is gone. Only watched, never signalled. `since`: its QEMU's start time (the keeper
    starts after it). A keeper started alone names the file on its command line; one forked
    by the keeper zygote has the zygote's command line and is known by the file it holds
    open (the zygote itself holds none for longer than a fork). The keeper's script is
    matched by its name only: one started by an earlier version of the daemon, installed
    elsewhere, is the VM's keeper all the same. Reads /proc: off the loop."""
    path, script = str(files.path), os.path.basename(console_keeper.__file__)
    for pid, _, cmdline in live_processes(since):
        if not any(os.path.basename(arg) == script for arg in cmdline):
            continue
        if len(cmdline) >= 6 and cmdline[-5] == path and os.path.basename(cmdline[-6]) == script:
            return pid
        if _holds_open(pid, path) and not _is_zygote(pid):
            return pid
    return None


def _holds_open(pid: int, path: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
    return False


def _is_zygote(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            return comm.read().strip() == console_keeper.ZYGOTE_NAME
    except OSError:
        return False


class QemuOutput:
    def __init__(
        self,
        popen: subprocess.Popen[bytes] | None,
        on_line: LineCallback | None,
        exited: asyncio.Future[Any],
    ) -> None:
        self._popen = popen
        self._on_line = on_line
        self._exited = exited
        self._tail: deque[tuple[str, str]] = deque(maxlen=TAIL_LINES)
        self._pipes: list[asyncio.Future[None]] = []
        self._attached: set[str] = set()
        self.console_files: ConsoleFiles | None = None  # QEMU's output kept by a keeper
        self._console: ConsoleReader | None = None
        self.keeper_reaped: asyncio.Future[None] | None = None  # a keeper this daemon started
        self._on_history: HistoryCallback | None = None
        # Told once, with the words, when the keeper is gone while QEMU runs (set by the VM).
        self.on_keeper_lost: Callable[[str], None] | None = None
        self._keeper_watch: asyncio.Task[None] | None = None

    async def attach(self) -> None:
        """Connects QEMU's stdout and stderr to the line callback."""
        assert self._popen is not None
        if self.console_files is not None:
            self._console = ConsoleReader(self.console_files, self._console_line, history=False)
            if self.keeper_reaped is not None:
                self._keeper_watch = asyncio.ensure_future(
                    self._watch_keeper(self.keeper_reaped, None)
                )
            return
        loop = asyncio.get_running_loop()
        for stream, pipe in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
            if pipe is None or pipe.closed:
                continue
            reader = LineReader(stream, self._line)
            self._pipes.append(reader.closed)
            try:
                await loop.connect_read_pipe(lambda r=reader: r, pipe)  # type: ignore[misc]
            except BaseException:
                pipe.close()
                reader.connection_lost(None)
                raise
            self._attached.add(stream)

    def close_pipes(self) -> None:
        """Pipes never attached (a start cancelled in attach) are closed here."""
        if self._popen is not None:
            for stream, pipe in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
                if pipe is not None and stream not in self._attached:
                    pipe.close()

    def follow_console(
        self,
        files: ConsoleFiles,
        on_line: LineCallback,
        on_history: HistoryCallback,
        qemu_start_time: int,
    ) -> None:
        """For an adopted VM: what its keeper wrote before (`on_history`), then its new lines
        (`on_line`), as a VM started by this daemon has them; its keeper watched from here on
        (`qemu_start_time`: the keeper started after its QEMU)."""
        self.console_files, self._on_line, self._on_history = files, on_line, on_history
        self._console = ConsoleReader(files, self._console_line, history=True)
        self._keeper_watch = asyncio.ensure_future(self._watch_adopted_keeper(qemu_start_time))

    async def _watch_adopted_keeper(self, since: int) -> None:
        assert self.console_files is not None
        loop = asyncio.get_running_loop()
        pid = await asyncio.to_thread(find_keeper, self.console_files, since)
        pidfd = None
        if pid is not None:
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
        if pidfd is None:  # gone already (while no daemon ran)
            await self._keeper_ended(None)
            return
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await ended
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        await self._keeper_ended(pid)

    async def _watch_keeper(self, reaped: asyncio.Future[None], pid: int | None) -> None:
        await asyncio.shield(reaped)
        await self._keeper_ended(pid)

    async def _keeper_ended(self, pid: int | None) -> None:
        """Its last record, written once both pipes ended, says QEMU's output ended with it;
        none while QEMU runs is a console lost."""
        console = self._console
        if console is None:
            return
        await console.drain(LAST_RECORD_WAIT)
        if console.last_record_read or self._exited.done() or self._keeper_watch is None:
            return
        who = f"the console keeper (pid {pid})" if pid else "the console keeper"
        if self.on_keeper_lost is not None:
            self.on_keeper_lost(
                f"{who} of this VM is gone while QEMU runs: QEMU's output from now on is lost "
                "(Logs, Events and the daemon's log get no more of its console)"
            )

    async def history_read(self, timeout: float) -> None:
        """Waits (up to `timeout`) until what the console file held at adoption is read: Logs
        answered after that has the lines from before the restart."""
        if self._console is not None:
            await done_within(self._console.caught_up, timeout)

    def _console_line(self, stream: str, text: str, timestamp_ns: int, live: bool) -> None:
        if live:
            self._line(stream, text)
        elif self._on_history is not None:
            self._on_history(stream, text, timestamp_ns)

    def _poke_console(self) -> None:
        if self._console is not None:
            self._console.poke()

    def close_console(self) -> None:
        """Stops reading the console file (the daemon lets go of the VM, or it was released)."""
        if self._console is not None:
            self._console.close()
        watch, self._keeper_watch = self._keeper_watch, None
        if watch is not None:
            watch.cancel()

    def _line(self, stream: str, text: str) -> None:
        self._tail.append((stream, text))
        if self._on_line is not None:
            self._on_line(stream, text)

    def tail(self, stream: str | None = None) -> list[str]:
        return [text for s, text in self._tail if stream is None or s == stream]

    async def wait(self, timeout: float = 1.0, *, keeper: bool = True) -> None:
        """After exit, the last lines may still be in the pipes: let them arrive. Never cancels
        the readers (as a timed-out gather would): a process that inherited QEMU's output can
        hold it open past any wait, and its lines still belong to the VM. `keeper=False`: the
        keeper's end is left to a later `keeper_gone` once its last record is read; a keeper
        held up past the drain (a loaded host) is still waited for, as its end pokes the
        reading: the lines it had yet to copy are QEMU's last, and reading stops at the release."""
        if self._console is not None:
            if self.keeper_reaped is not None:
                self.keeper_reaped.add_done_callback(lambda _: self._poke_console())
            await self._console.drain(timeout)
        if keeper or (self._console is not None and not self._console.last_record_read):
            await self.keeper_gone(timeout)
        if pending := [pipe for pipe in self._pipes if not pipe.done()]:
            await asyncio.wait(pending, timeout=timeout)

    async def keeper_gone(self, timeout: float = 1.0) -> None:
        """Once QEMU has exited: until its keeper has ended too (and been reaped)."""
        if self.keeper_reaped is not None and self._exited.done():
            # QEMU's output ended with it, so its keeper ends at once, or as soon as it has
            # started (a QEMU that died within milliseconds): reaped before the release ends
            # (for a QEMU that exited on its own, after its `vm-exit`), so a failed Run leaves
            # no process behind and a daemon exiting right after no zombie of init's. Only a
            # keeper whose pipes another process holds is not waited.
            held = self._console is not None and not self._console.last_record_read
            bound = timeout if held else max(timeout, KEEPER_END_WAIT)
            await done_within(self.keeper_reaped, bound)

    def failure_text(self) -> str:
        """QEMU's own words, for a status message: its stderr, else whatever it printed."""
        lines = self.tail("stderr") or self.tail()
        return "; ".join(lines[-5:]) if lines else "(QEMU printed nothing)"
