"""One QEMU process: started as a child, or adopted after a daemon restart, and supervised.

Its exit is noticed at once through a pidfd on the event loop (no polling, no thread per
VM), a child is reaped right then (the original left zombies), and signals
go through the pidfd so a recycled PID can never be hit. Readiness is QEMU's own: the QMP
monitor on a socket the daemon created and handed over, answering `query-status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocos_manager.errors import QemuExitedError, ReadinessTimeoutError, VmStartError
from cocos_manager.qemu_failures import classify_start_failure, launch_failure
from cocos_manager.qmp import QmpError, QmpMonitor, open_running_monitor
from cocos_manager.state_store import process_identity, process_start_time
from cocos_manager.vm_files import unix_socket_path
from cocos_manager.workers import pool as _workers

LineCallback = Callable[[str, str], None]
# CSI with any parameter bytes (OVMF sends "ESC [ = 3 h"), charset selection ("ESC ( B"), and
# the other two-byte escapes.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[ -/]+[0-~]|[@-Z\\-_])")
_MAX_LINE = 64 * 1024
TAIL_LINES = 20


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How QEMU ended; returncode is None for an adopted process (not our child)."""

    returncode: int | None

    @property
    def signal(self) -> int | None:
        if self.returncode is not None and self.returncode < 0:
            return -self.returncode
        return None

    def describe(self) -> str:
        if self.returncode is None:
            return "exited (status unknown: not a child of this daemon)"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            return f"killed by signal {name}"
        return f"exit status {self.returncode}"


class _LineReader(asyncio.Protocol):
    """Splits a pipe into lines for logs and Events; bounded memory per line."""

    def __init__(self, stream: str, sink: Callable[[str, str], None]) -> None:
        self._stream = stream
        self._sink = sink
        self._partial = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        while len(self._partial) > _MAX_LINE:  # output without newlines: cut, keep memory flat
            lines.append(self._partial[:_MAX_LINE])
            self._partial = self._partial[_MAX_LINE:]
        for raw in lines:
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        text = _ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r", "").rstrip()
        if text:
            self._sink(self._stream, text)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        if not self.closed.done():
            self.closed.set_result(None)


class QemuProcess:
    def __init__(
        self,
        pid: int,
        argv: Sequence[str],
        *,
        popen: subprocess.Popen[bytes] | None,
        on_line: LineCallback | None = None,
        start_time: int | None = None,
    ) -> None:
        self.pid = pid
        self.argv = list(argv)
        self._popen = popen
        self._on_line = on_line
        self._tail: deque[tuple[str, str]] = deque(maxlen=TAIL_LINES)
        self._pipes: list[asyncio.Future[None]] = []
        self._attached: set[str] = set()
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[ExitInfo] = self._loop.create_future()
        self.monitor: QmpMonitor | None = None  # QEMU's QMP session, once it answered
        self._pidfd: int | None = os.pidfd_open(pid)
        # The command line is read once QEMU answers (reading it mid-exec stalls the loop).
        if start_time is None:
            start_time = process_start_time(pid)
        self.start_time, self.cmdline = start_time, list[str]()
        self._loop.add_reader(self._pidfd, self._on_pidfd)

    # -- starting ------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        qmp_listener: socket.socket,
        on_line: LineCallback | None = None,
        env: dict[str, str] | None = None,
    ) -> QemuProcess:
        """Starts QEMU and returns its owner; a caller cancelled here has the process reaped,
        and one cancelled at its next await still holds it. Its output is connected by
        `attach_output()`.

        Popen waits until the child has exec'd, and under a burst (32 TCG guests taking the
        CPUs) that wait was about 30 ms per VM with the event loop blocked: it runs in a
        worker thread, with the start time read there too, so spawns overlap (make bench).
        """
        spawning = asyncio.get_running_loop().run_in_executor(
            _workers, _spawn, list(argv), qmp_listener.fileno(), env
        )
        try:
            popen, start_time = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                popen, _ = await spawning
                _kill(popen)
            raise
        try:
            return cls(popen.pid, argv, popen=popen, on_line=on_line, start_time=start_time)
        except BaseException:
            _kill(popen)
            raise

    async def attach_output(self) -> None:
        """Connects QEMU's stdout and stderr to the line callback."""
        assert self._popen is not None
        loop = asyncio.get_running_loop()
        for stream, pipe in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
            if pipe is None or pipe.closed:
                continue
            reader = _LineReader(stream, self._line)
            self._pipes.append(reader.closed)
            try:
                await loop.connect_read_pipe(lambda r=reader: r, pipe)  # type: ignore[misc]
            except BaseException:
                pipe.close()
                reader.connection_lost(None)
                raise
            self._attached.add(stream)

    def close_pipes(self) -> None:
        """Pipes never attached (a start cancelled in attach_output) are closed here."""
        if self._popen is not None:
            for stream, pipe in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
                if pipe is not None and stream not in self._attached:
                    pipe.close()

    @classmethod
    def adopt(
        cls, pid: int, argv: Sequence[str], start_time: int, cmdline: Sequence[str] | None
    ) -> QemuProcess:
        """Supervises a QEMU started by an earlier run of the daemon (not our child).

        The pidfd is opened first and the identity checked after, so the process checked is
        the one held: raises ProcessLookupError unless PID and start time match, and the
        command line too when it is known (it is recorded once QEMU is ready; before that,
        a wrapper such as env or a script may still be exec'ing, and the start time, which
        exec does not change, is what identifies the process).
        """
        process = cls(pid, argv, popen=None)
        identity = process_identity(pid)
        same = identity is not None and identity[0] == start_time
        if same and cmdline is not None:
            same = identity is not None and identity[1] == list(cmdline)
        if not same or process.exited.done():
            process._close_pidfd()
            raise ProcessLookupError(pid)
        return process

    async def check_qmp(self, qmp_path: Path, timeout: float, *, paused: bool = False) -> None:
        """For an adopted VM: its monitor answers and says `running` (any status for one kept
        paused); the session is kept."""
        self.monitor = await asyncio.wait_for(
            open_running_monitor(qmp_path, paused=paused), timeout
        )

    def _line(self, stream: str, text: str) -> None:
        self._tail.append((stream, text))
        if self._on_line is not None:
            self._on_line(stream, text)

    def tail(self, stream: str | None = None) -> list[str]:
        return [text for s, text in self._tail if stream is None or s == stream]

    # -- exit ----------------------------------------------------------------------------

    def _on_pidfd(self) -> None:
        self._close_pidfd()
        returncode = self._popen.poll() if self._popen is not None else None
        if not self.exited.done():
            self.exited.set_result(ExitInfo(returncode))

    async def detach(self) -> None:
        """Lets go of a QEMU left running for the next start of the daemon: its QMP session
        (the monitor serves one client, which must be the next daemon's) and its pidfd."""
        if self.monitor is not None:
            await self.monitor.close()
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def wait_output(self, timeout: float = 1.0) -> None:
        """After exit, the last lines may still be in the pipes: let them arrive."""
        if self._pipes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._pipes), timeout)

    def failure_text(self) -> str:
        """QEMU's own words, for a status message: its stderr, else whatever it printed."""
        lines = self.tail("stderr") or self.tail()
        return "; ".join(lines[-5:]) if lines else "(QEMU printed nothing)"

    # -- readiness -----------------------------------------------------------------------

    async def exited_at_start(self, during: str = "during start-up") -> QemuExitedError:
        """The typed error for a QEMU that exited before its VM was handed to the client."""
        await self.wait_output()
        exit_text = self.exited.result().describe()
        stderr = self.tail("stderr")
        return QemuExitedError(
            f"QEMU exited {during} ({exit_text}): {self.failure_text()}",
            exit=exit_text,
            stderr=stderr,
            conflict=(c.value if (c := classify_start_failure(stderr)) else None),
        )

    async def wait_ready(self, qmp_path: Path, timeout: float) -> None:
        """Returns once QMP says the VM runs; raises VmStartError with QEMU's message if not."""
        probe = asyncio.ensure_future(open_running_monitor(qmp_path))
        contenders: set[asyncio.Future[Any]] = {probe, self.exited}
        try:
            done, _ = await asyncio.wait(
                contenders, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not probe.done():
                probe.cancel()
            with contextlib.suppress(BaseException):
                await probe  # also retrieves an error nobody will look at (QEMU died first)
            ready = probe.done() and not probe.cancelled() and probe.exception() is None
            if ready and self.exited.done():  # dead anyway: not a monitor to keep
                await probe.result().close()
        if self.exited in done:
            raise await self.exited_at_start()
        if probe not in done:
            raise ReadinessTimeoutError(f"QEMU did not become ready within {timeout:g}s")
        try:
            self.monitor = probe.result()
        except QmpError as error:
            raise VmStartError(str(error)) from None
        except Exception as error:
            # A QEMU that dies at start resets the monitor connection, often just before its
            # pidfd reports the exit: give the exit a moment to show, so the error is QEMU's.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), 1.0)
            if self.exited.done():
                raise await self.exited_at_start() from None
            raise VmStartError(f"QEMU's QMP monitor failed: {error}") from None
        # QMP answered from the final image (after any sudo/env exec): its identity is final.
        self.start_time, self.cmdline = process_identity(self.pid) or (self.start_time, [])

    # -- stopping ------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    async def terminate(self, timeout: float) -> ExitInfo:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns once reaped."""
        if not self.exited.done():
            self.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            except TimeoutError:
                self.send_signal(signal.SIGKILL)
        result = await asyncio.shield(self.exited)
        await self.wait_output(0.5)
        return result

    def kill_now(self) -> None:
        """Last resort during clean-up of a failed start."""
        self.send_signal(signal.SIGKILL)


def _spawn(
    argv: list[str], qmp_fd: int, env: dict[str, str] | None
) -> tuple[subprocess.Popen[bytes], int]:
    """In a worker thread. Popen (vfork+exec) rather than asyncio's subprocess: exits are
    watched through a pidfd for children and adopted processes alike."""
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(qmp_fd,),
            start_new_session=True,  # a Ctrl-C or a daemon crash does not take the VMs along
            env=env,
        )
    except OSError as error:  # QEMU or sudo gone or not executable since start-up
        raise launch_failure(argv, error) from None
    return popen, process_start_time(popen.pid)


def _kill(popen: subprocess.Popen[bytes]) -> None:
    popen.kill()
    popen.wait()
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()


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
