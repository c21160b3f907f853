"""The keeper zygote's daemon side: each VM's console keeper forked by one small process.

A keeper started as an interpreter of its own costs about 20 ms of CPU, paid beside its
QEMU: in a burst of 32 Runs, 32 interpreter start-ups competed with the 32 QEMUs for the
CPUs. The zygote (console_keeper.py `--zygote`, standard library only) is started once, at
the first keeper, and forks every later one: a fork of a small single-threaded process per
VM. The keepers are the same (session of their own, same file contract, outliving the
daemon); only their parent differs. See docs/decisions.md, "The console survives the daemon".

Used from the keepers' thread only (console_file.py): one request at a time, so answers
come in order. A zygote that is gone (killed, or ran out of processes) is made again at the
next keeper, and whatever cannot be forked is started directly by the caller: a Run never
depends on the zygote.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from cocos_manager.telemetry import get_logger

ANSWER_TIMEOUT = 5.0  # a fork, or the zygote's own start-up on a loaded host
_log = get_logger()


@dataclass(slots=True)
class Keeper:
    """A started keeper: `pidfd` is the daemon's own (readable once the keeper ended);
    `popen` for one the daemon started itself, its child to reap."""

    pid: int
    pidfd: int
    popen: subprocess.Popen[bytes] | None = None

    def wait(self, timeout: float) -> bool:
        """Blocks until the keeper has ended (tests); False after `timeout` seconds."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return bool(select.select([self.pidfd], [], [], timeout)[0])


class _GoneUnanswered(Exception):
    """The zygote ended (killed, OOM-killed) with the request unanswered and no keeper forked
    for it alive (a forked one answers first, and holds the socket until then)."""


class KeeperZygote:
    def __init__(self, script: str) -> None:
        self._script = script
        self._channel: socket.socket | None = None
        self._pidfd: int | None = None  # the zygote's, to end one that stopped answering

    def start(self, path: str, max_bytes: int, fds: tuple[int, int, int]) -> Keeper | None:
        """A keeper forked for these descriptors (the file's, QEMU's stdout and stderr read
        ends; the caller keeps and closes its own); None when no zygote could fork it and
        none was forked: the caller starts the keeper itself."""
        request = b"%d\0%s" % (max_bytes, os.fsencode(path))
        for _ in range(2):  # a zygote found gone is made again, once
            channel = self._channel or self._make()
            if channel is None:
                return None
            try:
                socket.send_fds(channel, [request], list(fds))
            except OSError:
                self._drop()
                continue
            try:
                return self._answer(channel)
            except _GoneUnanswered:  # it took the request with it (killed, OOM): made again
                continue
        return None

    def close(self) -> None:
        """The zygote ends at its end of file; the keepers it forked live on."""
        self._drop()

    def _answer(self, channel: socket.socket) -> Keeper | None:
        """The keeper forked, or None (the zygote could not fork, or was stuck and ended);
        _GoneUnanswered when the zygote ended without a word, no keeper of it alive."""
        timed_out = False
        try:
            data, fds, _, _ = socket.recv_fds(channel, 64, 1)
        except TimeoutError:
            timed_out = True
            # Stuck (stopped, swapped out): ended, then a keeper it may have forked still
            # answers (a forked keeper sends its pidfd first); nothing else can any more.
            if self._pidfd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            try:
                data, fds, _, _ = socket.recv_fds(channel, 64, 1)
            except OSError:
                data, fds = b"", []
            self._drop()
        except OSError:
            data, fds = b"", []
        if data and data != b"E" and len(fds) == 1:
            return Keeper(int(data), fds[0])
        for fd in fds:
            os.close(fd)
        if not data:  # end of file: the zygote is gone, and no keeper of it holds the socket
            self._drop()
            if not timed_out:
                raise _GoneUnanswered
        return None

    def _make(self) -> socket.socket | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.settimeout(ANSWER_TIMEOUT)
        parent: subprocess.Popen[bytes] | None = None
        fds: list[int] = []
        try:
            # It forks itself away at once: no child of the daemon, never its zombie.
            parent = subprocess.Popen(
                [sys.executable, "-I", "-S", self._script, "--zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
            theirs.close()
            data, fds, _, _ = socket.recv_fds(ours, 64, 1)  # its pid and pidfd: it runs
            if not data or len(fds) != 1:
                raise ConnectionError("the keeper zygote ended at start")
        except (OSError, ValueError) as error:
            _log.warning(
                "the console keepers' zygote could not start: keepers are started one by one",
                error=repr(error),
            )
            for fd in fds:
                os.close(fd)
            ours.close()  # a zygote still starting ends at its end of file
            if parent is not None and parent.poll() is None:
                parent.kill()
            return None
        finally:
            theirs.close()
            if parent is not None:
                parent.wait()  # the first process, gone once it forked the zygote
        self._channel, self._pidfd = ours, fds[0]
        return ours

    def _drop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
