"""One open QMP session per VM: readiness, QEMU's own events, and commands (powerdown, quit).

The daemon keeps the session it made readiness with rather than reconnecting: QEMU's monitor
serves one client at a time, its events (STOP, GUEST_PANICKED, SHUTDOWN...) only reach a
client that is connected when they happen, and a command such as `quit` works where a signal
cannot (a QEMU started through sudo belongs to root). Spoken directly: a client library
(qemu.qmp) cost each Run about 5 ms more in its reader/writer tasks (make bench), and keeps an
unbounded event history. See docs/decisions.md, "QMP". The socket itself is made here too and
handed to QEMU already listening, so there is no race to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cocos_manager.host import outcome_seen

_SUN_PATH_MAX = 107


@contextlib.contextmanager
def unix_socket_path(path: Path) -> Iterator[str]:
    """A path bind()/connect() accept even when `path` is longer than sun_path allows.

    Deep TMP_FILE_LOC folders are common (systemd state dirs, test folders); the directory is
    reached through /proc/self/fd instead, which keeps the address short.
    """
    if len(str(path).encode()) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


_LINE_LIMIT = 1 << 20
EventCallback = Callable[[dict[str, Any]], None]


class QmpError(Exception):
    """QEMU's monitor answered with an error, or not in QMP."""


class QmpClosed(ConnectionError):
    """The monitor connection ended (QEMU exited, or closed it)."""


class QmpMonitor:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._greeted: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._on_event: EventCallback | None = None
        # Events before anyone watches (QEMU may stop the guest right behind the answer that
        # made the VM ready): kept, a bounded few, for the first watcher.
        self._early: deque[dict[str, Any]] = deque(maxlen=64)
        self._task = asyncio.get_running_loop().create_task(self._read(), name="qmp-reader")
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def on_event(self) -> EventCallback | None:
        return self._on_event

    @on_event.setter
    def on_event(self, callback: EventCallback | None) -> None:
        self._on_event = callback
        while callback is not None and self._early:
            callback(self._early.popleft())

    @classmethod
    async def connect(cls, path: Path) -> QmpMonitor:
        """Connects and negotiates capabilities; the monitor is usable at once (commands are
        queued behind the negotiation, which QEMU runs in order as soon as its loop starts)."""
        with unix_socket_path(path) as address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address)  # a listening UNIX socket accepts into its backlog at once
                reader, writer = await asyncio.open_connection(sock=sock, limit=_LINE_LIMIT)
            except BaseException:
                sock.close()
                raise
        monitor = cls(reader, writer)
        # Its answer is not waited for; a refusal shows in the next command's answer, as QEMU
        # takes no other command before the negotiation. Seen here so asyncio never logs it.
        monitor._send("qmp_capabilities").add_done_callback(outcome_seen)
        return monitor

    def _send(self, command: str, arguments: dict[str, Any] | None = None) -> asyncio.Future[Any]:
        if self.closed.done():
            raise QmpClosed("QEMU's QMP monitor is closed")
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(reply)
        self._writer.write(json.dumps(request).encode() + b"\n")
        return reply

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """The command's `return`; QmpError for QEMU's error, QmpClosed if the session ends."""
        return await asyncio.shield(self._send(command, arguments))

    async def query_status(self) -> str:
        reply = await self.execute("query-status")
        return str(reply.get("status", "")) if isinstance(reply, dict) else ""

    async def _read(self) -> None:
        error: BaseException = QmpClosed("QEMU closed its QMP monitor")
        try:
            while True:
                line = await self._reader.readline()
                if not line.endswith(b"\n"):
                    break
                try:
                    message = json.loads(line)
                except ValueError:
                    error = QmpError(f"not QMP: {line[:200]!r}")
                    break
                if not isinstance(message, dict):
                    error = QmpError(f"not QMP: {line[:200]!r}")
                    break
                self._dispatch(message)
        except (ConnectionError, OSError, ValueError) as failure:
            # ValueError: a line over the limit (asyncio's LimitOverrunError is one).
            error = QmpClosed(f"QMP monitor connection lost: {failure}")
        finally:
            self._finish(error)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "QMP" in message:
            if not self._greeted.done():
                self._greeted.set_result(message)
            return
        if "event" in message:
            if self._on_event is not None:
                self._on_event(message)
            else:
                self._early.append(message)
            return
        if not self._pending:
            return  # a reply nobody asked for: not ours to judge
        reply = self._pending.popleft()
        if reply.done():
            return
        if "error" in message:
            failure = message["error"]
            text = failure.get("desc", str(failure)) if isinstance(failure, dict) else failure
            reply.set_exception(QmpError(str(text)))
        else:
            reply.set_result(message.get("return"))

    def _finish(self, error: BaseException) -> None:
        while self._pending:
            reply = self._pending.popleft()
            if not reply.done():
                reply.set_exception(error)
                reply.exception()  # retrieved: a caller may have gone away
        if not self._greeted.done():
            self._greeted.set_exception(error)
            self._greeted.exception()
        self._writer.close()
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        self._task.cancel()
        try:
            # Waited for, not awaited: the reader's CancelledError is its own, and a caller
            # cancelled meanwhile must not have its cancellation taken for the reader's.
            await asyncio.wait([self._task])
        finally:
            if self._task.done() and not self._task.cancelled():
                self._task.exception()  # seen: the reader's end says nothing more here
            self._finish(QmpClosed("closed by the manager"))

    def abandon(self) -> None:
        """Closes at once, without waiting for the reader: for a session nobody will use, let
        go by a caller that is itself ending."""
        self._task.cancel()
        self._task.add_done_callback(outcome_seen)
        self._finish(QmpClosed("closed by the manager"))


def abandon_opened(opening: asyncio.Future[QmpMonitor]) -> None:
    """A done-callback for an opening whose caller went away: the session it opened, if any,
    is abandoned."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().abandon()


async def open_running_monitor(path: Path, *, paused: bool = False) -> QmpMonitor:
    """Greeting, qmp_capabilities, query-status = running: the three steps of libvirt's and
    Kata's readiness check; the session stays open for the VM's life. `paused`: a VM kept
    paused for inspection (MANAGER_QEMU_ON_GUEST_HALT=keep) answers with any status."""
    monitor = await QmpMonitor.connect(path)
    try:
        status = await monitor.query_status()
    except BaseException:
        await monitor.close()
        raise
    if status != "running" and not paused:
        await monitor.close()
        raise QmpError(f"QEMU reports VM status {status!r} instead of 'running'")
    return monitor


def qmp_listener(path: Path) -> socket.socket:
    """The QMP socket, created by us and handed to QEMU as a listening fd (no connect race)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_socket_path(path) as address:
            listener.bind(address)
        os.chmod(path, 0o600)
        listener.listen(4)
    except BaseException:
        listener.close()
        raise
    return listener


def qmp_args(listener: socket.socket) -> list[str]:
    return [
        "-chardev",
        f"socket,id=cocos-qmp,fd={listener.fileno()},server=on,wait=off",
        "-mon",
        "chardev=cocos-qmp,mode=control",
    ]
