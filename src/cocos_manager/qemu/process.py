"""One QEMU process: started as a child, or adopted after a daemon restart, and supervised.

Its exit is noticed at once through a pidfd on the event loop (no polling, no thread per
VM), a child is reaped right then (the original left zombies), and signals
go through the pidfd so a recycled PID can never be hit. Readiness is QEMU's own: the QMP
monitor on a socket the daemon created and handed over, answering `query-status`. Its output
is read in streams.py (QemuOutput); where a signal is not permitted (QEMU behind sudo),
the ways around it are in sudo.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cocos_manager.errors import (
    QemuExitedError,
    QemuStopFailedError,
    ReadinessTimeoutError,
    SudoRefusedError,
    VmStartError,
)
from cocos_manager.host import (
    done_within,
    outcome_seen,
    outlast,
    process_identity,
    process_start_time,
    start_pool,
)
from cocos_manager.qemu import sudo as sudo_stop
from cocos_manager.qemu.console_file import ConsoleFiles
from cocos_manager.qemu.console_start import KeeperStart, reap_keeper, spawn_kept
from cocos_manager.qemu.failures import classify_start_failure, classify_sudo_refusal
from cocos_manager.qemu.qmp import QmpError, QmpMonitor, abandon_opened, open_running_monitor
from cocos_manager.qemu.spawn import ExitInfo, kill_pids, kill_spawned, signal_pidfd, spawn
from cocos_manager.qemu.streams import LineCallback, QemuOutput
from cocos_manager.telemetry import get_logger

_log = get_logger()


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
        # Through sudo (MANAGER_QEMU_USE_SUDO): `pid` is sudo's, QEMU is its child and root's.
        self.wrapped = bool(self.argv) and os.path.basename(self.argv[0]) == "sudo"
        self._qmp_path: Path | None = None
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[ExitInfo] = self._loop.create_future()
        self.output = QemuOutput(popen, on_line, self.exited)  # its stdout and stderr
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
        console: ConsoleFiles | None = None,
        on_keeper_lost: Callable[[str], None] | None = None,
        on_unstoppable: Callable[[QemuStopFailedError], None] | None = None,
    ) -> QemuProcess:
        """Starts QEMU and returns its owner; a caller cancelled here has the process reaped
        (`on_unstoppable` is told if it outlives that), and one cancelled at its next await
        still holds it. Its output is connected by
        `attach_output()` (streams.py): pipes to the daemon, or with `console` a keeper process and its
        file, which outlive the daemon (console_file.py); `on_keeper_lost` is told if that
        keeper is gone while QEMU runs.

        Popen waits until the child has exec'd, and under a burst (32 TCG guests taking the
        CPUs) that wait was about 30 ms per VM with the event loop blocked: it runs in a
        worker thread, with the start time read there too, so spawns overlap (make bench).
        """
        queued = start_pool.submit(
            spawn_kept, spawn, list(argv), qmp_listener.fileno(), env, console
        )
        spawning = asyncio.wrap_future(queued)
        try:
            popen, start_time, keeper = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            if queued.cancel():  # still waiting for a worker (a burst): nothing was spawned
                raise
            await outlast_spawn(spawning, argv, on_unstoppable)
            raise
        process = owned(popen, start_time, keeper, argv, on_line)
        process.output.console_files = console
        process.output.on_keeper_lost = on_keeper_lost
        return process

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
        assert identity is not None
        # The command line just proven: the record written after this adoption must carry it,
        # or the next start could not prove the process ours again.
        process.start_time, process.cmdline = identity
        return process

    async def check_qmp(self, qmp_path: Path, timeout: float, *, paused: bool = False) -> None:
        """For an adopted VM: its monitor answers and says `running` (any status for one kept
        paused); the session is kept."""
        self._qmp_path = qmp_path
        async with asyncio.timeout(timeout):
            self.monitor = await open_running_monitor(qmp_path, paused=paused)

    async def attach_output(self) -> None:
        """Connects QEMU's stdout and stderr to the line callback (QemuOutput.attach)."""
        await self.output.attach()

    def tail(self, stream: str | None = None) -> list[str]:
        return self.output.tail(stream)

    def close_pipes(self) -> None:
        self.output.close_pipes()

    def close_console(self) -> None:
        self.output.close_console()

    async def wait_output(self, timeout: float = 1.0, *, keeper: bool = True) -> None:
        await self.output.wait(timeout, keeper=keeper)

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
        self.close_console()
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    # -- readiness -----------------------------------------------------------------------

    async def exited_at_start(
        self, during: str = "during start-up"
    ) -> QemuExitedError | SudoRefusedError:
        """The typed error for a QEMU that exited before its VM was handed to the client."""
        await self.wait_output()
        exit_text = self.exited.result().describe()
        stderr = self.tail("stderr")
        refusal = classify_sudo_refusal(stderr) if self.wrapped else None
        if refusal is not None:
            return sudo_stop.sudo_refused(self.argv, *refusal)
        return QemuExitedError(
            f"QEMU exited {during} ({exit_text}): {self.output.failure_text()}",
            exit=exit_text,
            stderr=stderr,
            conflict=(c.value if (c := classify_start_failure(stderr)) else None),
        )

    async def wait_ready(self, qmp_path: Path, timeout: float) -> None:
        """Returns once QMP says the VM runs; raises VmStartError with QEMU's message if not."""
        self._qmp_path = qmp_path
        probe = asyncio.ensure_future(open_running_monitor(qmp_path))
        probe.add_done_callback(outcome_seen)  # QEMU died first: nobody looks at its error
        contenders: set[asyncio.Future[Any]] = {probe, self.exited}
        try:
            done, _ = await asyncio.wait(
                contenders, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not probe.done():
                probe.cancel()  # its own clean-up closes the connection it made
                # Waited for, not awaited: the probe's CancelledError is its own, and a caller
                # cancelled meanwhile keeps its cancellation.
                await asyncio.wait([probe])
        except BaseException:
            # The caller was cancelled: a session the probe opened, or still opens, is nobody's
            # (left open, it would hold QEMU's one monitor, which a `quit` needs behind sudo).
            probe.cancel()
            probe.add_done_callback(abandon_opened)
            raise
        ready = not probe.cancelled() and probe.exception() is None
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
            if await done_within(self.exited, 1.0):
                raise await self.exited_at_start() from None
            raise VmStartError(f"QEMU's QMP monitor failed: {error}") from None
        # QMP answered from the final image (after any sudo/env exec): its identity is final.
        self.start_time, self.cmdline = process_identity(self.pid) or (self.start_time, [])

    # -- stopping ------------------------------------------------------------------------

    def _signal(self, sig: int) -> bool:
        return signal_pidfd(self._pidfd, sig)

    def send_signal(self, sig: int) -> None:
        self._signal(sig)

    def qemu_pids(self) -> list[int]:
        """The processes that are QEMU: this one, or sudo's descendants when wrapped."""
        return sudo_stop.descendants(self.pid) if self.wrapped else [self.pid]

    async def _quit(self) -> bool:
        return await sudo_stop.quit_over_qmp(self.monitor, self._qmp_path, self.pid)

    async def end_outlived(self) -> bool:
        """sudo has ended: ends a QEMU it left running (sudo_stop.end_outlived). Returns
        whether there was one."""
        ended = self.exited.result().returncode if self.exited.done() else None
        if not self.wrapped or (ended is not None and ended >= 0):
            return False  # sudo exits of its own only once its command has ended
        session = self.monitor is not None and not self.monitor.closed.done()
        return await sudo_stop.end_outlived(
            self.argv, self.pid, self.start_time, self._quit, session=session
        )

    async def _kill(self) -> bool:
        """The SIGKILL step. Behind sudo, SIGKILL goes to QEMU, never to sudo first: a sudo
        killed first leaves its QEMU running, root's and nobody's. Returns whether a way that
        ends QEMU for sure was taken."""
        if not self.wrapped:
            return self._signal(signal.SIGKILL)
        pids = self.qemu_pids()
        if not pids:  # sudo has not started QEMU yet, or QEMU is gone: sudo is ours to kill
            return self._signal(signal.SIGKILL)
        if kill_pids(pids):
            return True
        if await sudo_stop.sudo_kill(pids, self.pid):
            return True
        return await self._quit()  # QEMU may still answer its monitor

    async def terminate(self, timeout: float) -> ExitInfo:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns once reaped.

        Where a signal is not permitted (EPERM: root's QEMU behind sudo, or an adopted process
        of another user) QMP `quit` takes SIGTERM's place and `sudo -n kill -KILL` SIGKILL's;
        if nothing ends QEMU, QemuStopFailedError after a bounded wait names the PID and the
        sudoers rule, so a Stop or a shutdown never waits for ever."""
        if not self.exited.done():
            grace = timeout
            if self._signal(signal.SIGTERM):
                if self.wrapped:  # sudo relays it to QEMU: give the relay a moment
                    grace = max(timeout, sudo_stop.SUDO_TERM_GRACE)
            elif await self._quit():
                grace = max(timeout, sudo_stop.SUDO_TERM_GRACE)
            if not await done_within(self.exited, grace) and (
                not await self._kill() or self.wrapped
            ):
                await self._bounded_wait()
        result = await asyncio.shield(self.exited)
        await self.end_outlived()
        await self.wait_output(0.5)
        return result

    async def _bounded_wait(self) -> None:
        """Up to GIVE_UP_AFTER for the process to end. Behind sudo, once QEMU is gone, sudo
        itself is SIGKILLed should it linger (stopped along with a stopped QEMU, say): there is
        nothing left to orphan."""
        deadline = self._loop.time() + sudo_stop.GIVE_UP_AFTER
        try:
            while self.wrapped and not self.exited.done() and self.qemu_pids():
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    raise TimeoutError
                await done_within(self.exited, min(0.1, remaining))
            if self.wrapped and not await done_within(self.exited, 0.5):
                self._signal(signal.SIGKILL)
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(self.exited)
        except TimeoutError:
            raise sudo_stop.stop_failed(
                self.argv, self.pid, self.qemu_pids() or [self.pid], self.wrapped
            ) from None

    def kill_now(self) -> None:
        """Last resort during clean-up of a failed start (followed by terminate(0))."""
        if self.wrapped:
            # Never SIGKILL sudo here: QEMU, started or about to be, would live on, orphaned.
            # QEMU is killed where permitted (a root daemon); sudo relays a SIGTERM otherwise.
            kill_pids(self.qemu_pids())
            self.send_signal(signal.SIGTERM)
        else:
            self.send_signal(signal.SIGKILL)


async def outlast_spawn(
    spawning: asyncio.Future[Any],
    argv: Sequence[str],
    on_unstoppable: Callable[[QemuStopFailedError], None] | None = None,
) -> None:
    """The QEMU a cancelled start spawns is reaped as a failed attempt's is (kill_now +
    terminate): behind sudo, QEMU may already run as sudo's child, and a SIGKILLed sudo would
    leave it running, nobody's. Outlasts a second cancellation (a Stop): the release that
    follows counts on that QEMU being gone, and a QEMU that outlived it all is told to
    `on_unstoppable` (the VM's Stop answers with it) rather than only logged."""
    reaping = asyncio.ensure_future(reap_spawned(spawning, argv))
    await outlast(reaping)
    if spawning.cancelled() or spawning.exception() is not None:
        return  # nothing was spawned: the start's failure is moot, its caller went away
    error = None if reaping.cancelled() else reaping.exception()
    if isinstance(error, QemuStopFailedError) and on_unstoppable is not None:
        on_unstoppable(error)
    elif error is not None:
        _log.error("the QEMU of a cancelled start could not be stopped", error=str(error))


async def reap_spawned(spawning: asyncio.Future[Any], argv: Sequence[str]) -> None:
    """A QEMU spawned for a start that was cancelled meanwhile: ended as a failed start is."""
    popen, start_time, keeper = await spawning
    process = owned(popen, start_time, keeper, argv)
    process.close_pipes()
    process.kill_now()
    await process.terminate(0)


def owned(
    popen: subprocess.Popen[bytes],
    start_time: int,
    keeper: KeeperStart | None,
    argv: Sequence[str],
    on_line: LineCallback | None = None,
) -> QemuProcess:
    """The owner of what spawn_kept started, made before any await: its keeper's end watched,
    and QEMU killed should the owner not come to be (its pidfd not opened, say)."""
    keeper_reaped = reap_keeper(keeper) if keeper is not None else None
    try:
        process = QemuProcess(popen.pid, argv, popen=popen, on_line=on_line, start_time=start_time)
    except BaseException:
        kill_spawned(popen)
        raise
    process.output.keeper_reaped = keeper_reaped
    return process
