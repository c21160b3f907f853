"""QEMU's output becomes clean lines (split across reads, escape codes gone, bounded length),
and its last lines are waited for without giving up on the rest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cocos_manager.qemu import process as process_module
from cocos_manager.qemu.output import MAX_LINE, LineReader
from cocos_manager.qemu.process import QemuProcess
from cocos_manager.qemu.qmp import qmp_listener
from cocos_manager.qemu.spawn import ExitInfo
from cocos_manager.qemu.sudo import descendants
from tests.support.waiting import GUARD, wait_for


async def test_lines_are_split_cleaned_and_bounded() -> None:
    seen: list[tuple[str, str]] = []
    reader = LineReader("stdout", lambda stream, text: seen.append((stream, text)))
    reader.data_received(b"\x1b[2J\x1b[01;01H\x1b[=3hBOOT")
    reader.data_received(b"ED c1\r\nSERV")
    reader.data_received(b"ING c1\r\n\r\n\x1b(Bplain\n")
    reader.data_received(b"x" * (MAX_LINE + 10))
    reader.connection_lost(None)
    texts = [text for _, text in seen]
    assert texts[:3] == ["BOOTED c1", "SERVING c1", "plain"]
    assert sum(len(t) for t in texts[3:]) == MAX_LINE + 10
    assert all(len(t) <= MAX_LINE for t in texts)
    assert reader.closed.done()


def test_exit_descriptions() -> None:
    assert ExitInfo(0).describe() == "exit status 0"
    assert ExitInfo(-9).describe() == "killed by signal SIGKILL"
    assert ExitInfo(-9).signal == 9
    assert "unknown" in ExitInfo(None).describe()


async def test_waiting_for_output_that_a_child_holds_open_never_cancels_the_readers(
    tmp_path: Path,
) -> None:
    """QEMU's output can outlive QEMU: a helper that inherited it (an ifup script's daemon),
    or QEMU itself once it outlived sudo. A wait for the last lines that timed out cancelled
    the pipe readers, so the next wait raised CancelledError: a start failing so was answered
    "stopped while its VM was starting" (ABORTED), and the later lines were lost."""
    listener = qmp_listener(tmp_path / "qmp.sock")
    try:
        process = await QemuProcess.start(
            ["sh", "-c", "echo first; (sleep 0.5; echo late) & exit 3"], qmp_listener=listener
        )
    finally:
        listener.close()
    await process.attach_output()
    await asyncio.wait_for(asyncio.shield(process.exited), 5)
    await process.wait_output(0.01)  # the subshell still holds stdout
    await process.wait_output(0.01)
    await process.wait_output(5)
    assert process.tail() == ["first", "late"]


async def test_a_terminate_cancelled_as_qemu_exits_is_cancelled(tmp_path: Path) -> None:
    """Python 3.11's `asyncio.wait_for` returns the result of an awaitable that completed in
    the loop turn its caller was cancelled, and the cancellation is lost: a Stop whose caller
    went away went on as if nobody had asked it to stop. `asyncio.timeout` keeps it."""
    listener = qmp_listener(tmp_path / "qmp.sock")
    try:
        process = await QemuProcess.start(["sleep", "60"], qmp_listener=listener)
    finally:
        listener.close()
    terminating = asyncio.ensure_future(process.terminate(5))
    await asyncio.sleep(0)  # waiting for the exit SIGTERM brings
    process.exited.add_done_callback(lambda _: terminating.cancel())
    await asyncio.wait([terminating], timeout=10)
    process.close_pipes()
    assert process.exited.done()  # it did end
    assert terminating.cancelled()


async def test_a_readiness_wait_cancelled_at_any_turn_after_qemu_exits_is_cancelled(
    tmp_path: Path,
) -> None:
    """QEMU exits while the readiness probe waits for its greeting; the wait is cancelled
    (the Run's caller went away) a few loop turns later, while the probe's own clean-up runs.
    The wait used to swallow what awaiting that probe raised, the caller's cancellation
    included: the start went on to its next attempt as if nobody had cancelled it."""
    outcomes: dict[int, str] = {}
    for turns in range(10):
        qmp = tmp_path / f"qmp-{turns}.sock"
        listener = qmp_listener(qmp)
        try:  # a child holds the listening socket past QEMU's exit: the probe hears nothing
            process = await QemuProcess.start(
                ["sh", "-c", "sleep 30 & exec sleep 60"], qmp_listener=listener
            )
        finally:
            listener.close()
        await wait_for(lambda p=process.pid: descendants(p), "the listener's holder")
        holder = descendants(process.pid)
        waiting = asyncio.ensure_future(process.wait_ready(qmp, 30))
        await asyncio.sleep(0.05)  # the probe has connected; nobody will greet it
        late: list[bool] = []

        async def cancel_after(
            turns: int = turns, waiting: asyncio.Future[None] = waiting, late: list[bool] = late
        ) -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            late.append(waiting.done())
            waiting.cancel()

        cancelling: list[asyncio.Future[None]] = []
        process.exited.add_done_callback(
            lambda _, held=cancelling: held.append(asyncio.ensure_future(cancel_after()))
        )
        process.send_signal(signal.SIGKILL)
        await asyncio.wait([waiting], timeout=10)
        await asyncio.wait(cancelling, timeout=10)
        for pid in holder:
            os.kill(pid, signal.SIGKILL)
        process.close_pipes()
        assert waiting.done()
        if late == [True]:
            outcomes[turns] = "finished first"
        else:
            outcomes[turns] = (
                "cancelled" if waiting.cancelled() else type(waiting.exception()).__name__
            )
    on_time = {turns: said for turns, said in outcomes.items() if said != "finished first"}
    assert len(on_time) >= 3, outcomes  # the cancellation came while the wait still ran
    assert set(on_time.values()) == {"cancelled"}, outcomes


@pytest.mark.parametrize("spawn", ["spawns", "fails"])
async def test_a_spawn_cancelled_twice_ends_after_its_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn: str
) -> None:
    """The Run's caller goes away while QEMU is spawned (Popen in a worker thread, waiting
    for the exec: on a loaded host, behind sudo, that takes a while), and a Stop's cancellation
    follows. The second ended the start's wait for its clean-up: the release let the VM's
    numbers go and the Stop answered before that QEMU was even spawned, let alone ended. A
    spawn that fails meanwhile left nothing to stop, and is not logged as a QEMU that could
    not be stopped."""
    spawning, proceed = threading.Event(), threading.Event()
    spawned: list[subprocess.Popen[bytes]] = []
    real_spawn = process_module.spawn

    def gated_spawn(*args: Any, **kwargs: Any) -> tuple[subprocess.Popen[bytes], int]:
        spawning.set()
        proceed.wait(GUARD)
        if spawn == "fails":
            raise FileNotFoundError(2, "No such file or directory", "/opt/qemu")
        popen, start_time = real_spawn(*args, **kwargs)
        spawned.append(popen)
        return popen, start_time

    monkeypatch.setattr(process_module, "spawn", gated_spawn)
    listener = qmp_listener(tmp_path / "qmp.sock")
    try:
        with capture_logs() as logs:
            starting = asyncio.ensure_future(
                QemuProcess.start(["sleep", "60"], qmp_listener=listener)
            )
            assert await asyncio.to_thread(spawning.wait, GUARD)
            starting.cancel()  # the Run's caller
            await asyncio.sleep(0.01)
            starting.cancel()  # a Stop
            await asyncio.sleep(0.01)
            proceed.set()
            await asyncio.wait([starting], timeout=GUARD)
    finally:
        listener.close()
    assert starting.cancelled()
    assert [entry for entry in logs if entry["log_level"] == "error"] == []
    if spawn == "spawns":
        assert len(spawned) == 1, "the start ended before its QEMU was spawned"
        assert spawned[0].poll() is not None, "the start ended with its QEMU still running"


async def test_a_readiness_wait_cancelled_as_its_probe_succeeds_closes_that_session(
    tmp_path: Path,
) -> None:
    """The caller goes away in the loop turn QEMU's monitor answers `running`: the session
    the probe opened was neither kept nor closed, and held QEMU's one monitor until QEMU
    ended (behind sudo, a `quit` over a new session then waited for it in vain)."""
    sessions: list[asyncio.Future[None]] = []
    hooked = asyncio.Event()

    async def monitor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ended = asyncio.get_running_loop().create_future()
        sessions.append(ended)
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        while line := await reader.readline():
            command = json.loads(line)["execute"]
            if command == "query-status":
                await hooked.wait()
            answer = {"status": "running", "running": True} if command == "query-status" else {}
            writer.write(json.dumps({"return": answer}).encode() + b"\n")
        ended.set_result(None)  # the client closed its end
        writer.close()

    qmp = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(monitor, str(qmp))
    process = await QemuProcess.start(["sleep", "60"], qmp_listener=socket.socket())
    try:
        waiting = asyncio.ensure_future(process.wait_ready(qmp, 30))
        await wait_for(probes, "the readiness probe")
        (probe,) = probes()
        probe.add_done_callback(lambda _: waiting.cancel())
        hooked.set()
        await asyncio.wait([waiting], timeout=GUARD)
        assert waiting.cancelled()
        assert not probe.cancelled() and probe.exception() is None  # it did succeed
        assert process.monitor is None
        assert len(sessions) == 1
        await asyncio.wait_for(sessions[0], GUARD)  # closed, not left open
    finally:
        await process.terminate(5)
        process.close_pipes()
        server.close()


def probes() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "open_running_monitor"
    ]
