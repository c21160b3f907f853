"""A VM's console keeper: holds QEMU's stdout and stderr and writes them to a bounded file.

Run as its own process (`python -I -S console_keeper.py FILE MAX_BYTES FILE_FD STDOUT_FD
STDERR_FD`: FILE made and opened by the daemon, the other ends of QEMU's output pipes)
in a session of its own, so it outlives a daemon SIGKILLed, stopped with its VMs left
running, or upgraded: QEMU's output never goes to a pipe the daemon holds, and nothing QEMU
prints is lost while no daemon runs (libvirt's virtlogd and podman's conmon do the same).
The daemon reads the file (console_file.py) and follows it. It ends when both pipes reach
end of file: QEMU, and whatever inherited its output, have ended.

The disk a chatty guest can fill is bounded: FILE is rotated to FILE.1 when it would pass
half of MAX_BYTES, replacing the FILE.1 before it (the oldest lines). Every line has a
sequence number, so a reader tells from a gap how many lines were dropped (rotated away, or
not written for a full disk) and says so where they went missing.

The file is a contract between versions of the daemon (one may read a file another's keeper
writes, across an upgrade): docs/contracts.md, "Console files". One record per line:
    SEQ TIME_NS TAG PAYLOAD\n
TAG O: a line of QEMU's stdout, E: of its stderr (PAYLOAD: the line's bytes, no newline,
cut at MAX_LINE); V: the format version (PAYLOAD "1"), first in every file; X: the
keeper's last record, both pipes ended. SEQ counts O and E lines from 0.

Started per VM in one of two ways, with the same file and the same behaviour: as its own
interpreter (the command line above), or forked from the daemon's keeper zygote
(`python -I -S console_keeper.py --zygote SOCKET_FD`, keeper_zygote.py): one small process
that receives each VM's descriptors over a unix socket (SCM_RIGHTS) and forks a keeper for
it, so a burst of Runs pays a fork per VM instead of an interpreter's start-up beside its
QEMU. A forked keeper is in a session of its own too, and sends the daemon its own pidfd
before anything else: the daemon watches its end as it watches a keeper it started, and
learns that a keeper exists even if the zygote dies right after the fork. The zygote is no
child of the daemon (it forks itself away at start, so a dead one is never the daemon's
zombie) and ends when the daemon's end of the socket closes (the daemon's exit, SIGKILL
included); its keepers live on, as all keepers do.

Standard library only, and nothing imported from the daemon: it runs from this file alone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time

MAX_LINE = 64 * 1024
FORMAT_VERSION = b"1"
FILE_MODE = 0o600
KEEPER_NAME = b"console-keeper"  # /proc/PID/comm of a forked keeper
ZYGOTE_NAME = b"keeper-zygote"  # and of the zygote


class Sink:
    """The file and its rotation; a write that fails (a full disk) drops the line, counted
    by the gap in sequence numbers, and the keeper goes on reading: QEMU never blocks on it."""

    def __init__(self, path: str, max_bytes: int, fd: int) -> None:
        self.path = path
        self.half = max(1, max_bytes // 2)
        self.seq = 0
        self.fd = fd  # the file the daemon made for this QEMU, handed over open
        self.size = 0
        # The daemon removed the file, or made a new one for another QEMU of the VM: nothing
        # is written any more (the pipes are still read to their end: QEMU never blocks).
        self.released = not self._ours()
        if self.released:
            os.close(self.fd)
            self.fd = -1
        else:
            self._write(b"V", FORMAT_VERSION)

    def _ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False

    def _rotate(self) -> None:
        if not self._ours():  # never a file again once the VM's files are gone
            os.close(self.fd)
            self.fd = -1
            self.released = True
            return
        os.close(self.fd)
        self.fd = -1
        try:
            os.replace(self.path, self.path + ".1")
            self.fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                FILE_MODE,
            )
        except OSError:  # removed meanwhile: released
            self.released = True
            return
        os.fchmod(self.fd, FILE_MODE)  # the mode set, whatever the umask
        self.size = 0
        if not os.path.exists(self.path + ".1"):  # the daemon removed the VM's files meanwhile
            os.close(self.fd)
            self.fd = -1
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.released = True
            return
        self._write(b"V", FORMAT_VERSION)

    def _write(self, tag: bytes, payload: bytes) -> bool:
        if self.released:
            return False
        record = b"%d %d %s %s\n" % (self.seq, time.time_ns(), tag, payload)
        try:
            if self.size and self.size + len(record) > self.half:
                self._rotate()
                if self.released:
                    return False
            view = memoryview(record)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError:  # a full disk: this line is dropped, counted by the gap
            return False
        self.size += len(record)
        return True

    def line(self, tag: bytes, payload: bytes) -> None:
        self._write(tag, payload)
        self.seq += 1

    def end(self) -> None:
        self._write(b"X", b"")


def keep(path: str, max_bytes: int, fd: int, out_fd: int, err_fd: int) -> int:
    """Reads QEMU's two pipes to their end, writing every line to the file."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    streams = {out_fd: b"O", err_fd: b"E"}
    partial = {fd: b"" for fd in streams}
    sink = Sink(path, max_bytes, fd)
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    while partial:
        for fd, _ in poller.poll():
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            tag = streams[fd]
            if not data:
                if partial[fd]:
                    sink.line(tag, partial[fd])
                poller.unregister(fd)
                os.close(fd)
                del partial[fd]
                continue
            lines = (partial[fd] + data).split(b"\n")
            rest = lines.pop()
            while len(rest) > MAX_LINE:  # output without newlines: cut, keep memory flat
                lines.append(rest[:MAX_LINE])
                rest = rest[MAX_LINE:]
            partial[fd] = rest
            for raw in lines:
                sink.line(tag, raw)
    sink.end()
    return 0


def _name(name: bytes) -> None:
    """What `ps` and /proc/PID/comm show: a forked keeper has the zygote's command line."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as comm:
        comm.write(name)


def _reap(*_: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _forked_keeper(channel: socket.socket, request: bytes, fds: list[int]) -> int:
    """In the forked child: its pidfd to the daemon first (the answer), then the keeper."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()  # outlives the daemon and the zygote, as QEMU does
    _name(KEEPER_NAME)
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError:  # no pidfd (out of descriptors or memory): no keeper the daemon can watch
        pidfd = -1
        try:
            # As a failed fork: the daemon starts this keeper itself, on the same pipes (a
            # keeper here as well would split QEMU's lines and the file with it).
            channel.send(b"E")
            return 1
        except OSError:  # the daemon is gone: the VM's lines are kept all the same
            pass
    if pidfd >= 0:
        try:
            socket.send_fds(channel, [b"%d" % os.getpid()], [pidfd])
        except OSError:  # the daemon is gone: the VM's lines are kept all the same
            pass
        finally:
            os.close(pidfd)
    channel.close()
    max_bytes, path = request.split(b"\0", 1)
    return keep(os.fsdecode(path), int(max_bytes), *fds)


def zygote(channel_fd: int) -> int:
    """Forks a keeper for every request (`MAX_BYTES\0PATH`, with the file's descriptor and
    the two pipes') until the daemon's end of the socket closes."""
    if os.fork():
        os._exit(0)  # the daemon reaps this one at once; init (or a subreaper) has the zygote
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _reap)  # its keepers: never left zombies
    _name(ZYGOTE_NAME)
    channel = socket.socket(fileno=channel_fd)
    pidfd = os.pidfd_open(os.getpid())
    socket.send_fds(channel, [b"%d" % os.getpid()], [pidfd])  # the daemon may end it
    os.close(pidfd)
    while True:
        try:
            request, fds, _, _ = socket.recv_fds(channel, 8192, 3)
        except OSError:
            return 0
        if not request:
            return 0  # the daemon closed its end: its exit
        try:
            if len(fds) != 3:
                raise ValueError("three descriptors expected")
            if os.fork() == 0:  # the child never returns into this loop
                code = 1
                try:
                    code = _forked_keeper(channel, request, fds)
                finally:
                    os._exit(code)
        except (OSError, ValueError):  # no fork (no memory, a process limit): the daemon
            with contextlib.suppress(OSError):  # starts this keeper itself
                channel.send(b"E")
        finally:
            for fd in fds:
                os.close(fd)


def main(argv: list[str]) -> int:
    if argv[1] == "--zygote":
        return zygote(int(argv[2]))
    return keep(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]))


if __name__ == "__main__":
    code = main(sys.argv)
    # At once: a daemon that read the last record may look for processes of the VM right
    # after, and an interpreter's clean-up takes milliseconds.
    os._exit(code)
