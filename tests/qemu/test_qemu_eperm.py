"""A QEMU the daemon may not signal (EPERM: root's, behind MANAGER_QEMU_USE_SUDO, or an adopted
process of another user) is stopped without signals, and never leaves a computation STOPPING.

The kernel's answer is reproduced by making pidfd_send_signal raise PermissionError, as it does
for another user's process; everything else is real (the daemon's runner, gRPC, the stand-in
QEMU and its QMP monitor). tests/e2e/test_sudo.py runs the same paths with real sudo and QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.cli.verbs import vm_report
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu import process as qemu_process
from cocos_manager.qemu import sudo as sudo_stop
from cocos_manager.qemu.argv import Executable
from cocos_manager.qemu.failures import classify_sudo_refusal
from tests.support.harness import run_request, running_manager
from tests.support.processes import is_console_keeper, processes_mentioning
from tests.support.waiting import GUARD, unavailable, wait_for


def refuse_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    def eperm(pidfd: int, sig: int, *args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(signal, "pidfd_send_signal", eperm)


def vm_qemu(tmp_path: Path) -> int:
    (pid,) = [  # the VM's QEMU (its console keeper names the folder too)
        pid for pid in processes_mentioning(str(tmp_path / "vms")) if not is_console_keeper(pid)
    ]
    return pid


async def end_vm_qemu(tmp_path: Path) -> None:
    """The QEMU a test's daemon could not end; its console keeper ends with it (at the end of
    QEMU's output)."""
    for pid in processes_mentioning(str(tmp_path / "vms")):
        with contextlib.suppress(ProcessLookupError):  # a keeper ending meanwhile
            os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: not processes_mentioning(str(tmp_path)), "its end")


async def test_stop_without_permission_to_signal_quits_over_qmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop that waited for signals would take the whole STOP_TIMEOUT: longer than the bound.
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_STOP_TIMEOUT="90s") as m:
        await m.stub.Run(run_request("c1"))
        refuse_signals(monkeypatch)
        began = time.monotonic()
        await m.stub.Stop(pb.StopRequest(computation_id="c1"), timeout=60)
        assert time.monotonic() - began < 45
        assert processes_mentioning(str(tmp_path / "vms")) == []
        assert list((await m.stub.List(pb.ListRequest())).computations) == []


async def test_a_qemu_nothing_stops_is_released_and_stop_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sudo_stop, "SUDO_TERM_GRACE", 0.3)
    monkeypatch.setattr(sudo_stop, "GIVE_UP_AFTER", 0.5)
    async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_MODE="ignore-quit") as m:
        await m.stub.Run(run_request("c1"))
        pid = vm_qemu(tmp_path)
        refuse_signals(monkeypatch)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await m.stub.Stop(pb.StopRequest(computation_id="c1"), timeout=20)
            assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = failure.value.details() or ""
            assert f"pid {pid}" in details and "NOPASSWD" in details, details
            # Released all the same: not STOPPING for ever, the id may run again.
            assert list((await m.stub.List(pb.ListRequest())).computations) == []
            assert not any((tmp_path / "state").glob("*.json"))
        finally:
            await end_vm_qemu(tmp_path)


def test_sudo_command_keeps_the_qmp_descriptor() -> None:
    sudo = Executable(exe="sudo", prefix=("/usr/bin/qemu-system-x86_64",))
    assert sudo.vm_command(["-a"], keep_fds=(7,)) == [
        "sudo", "-n", "-C", "8", "--", "/usr/bin/qemu-system-x86_64", "-a",
    ]  # fmt: skip
    assert sudo.command(["-a"]) == ["sudo", "/usr/bin/qemu-system-x86_64", "-a"]  # the original
    plain = Executable(exe="/usr/bin/qemu-system-x86_64", prefix=())
    assert plain.vm_command(["-a"], keep_fds=(7,)) == ["/usr/bin/qemu-system-x86_64", "-a"]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("sudo: a password is required", "nopasswd"),
        ("sudo: a terminal is required to read the password; either use the -S option", "nopasswd"),
        ("sudo: you are not permitted to use the -C option", "closefrom"),
        ("cocos is not in the sudoers file.  This incident will be reported.", None),
        ("sudo: unable to change to root gid: Operation not permitted", "other"),
        ("qemu-system-x86_64: -kernel x: No such file", None),
    ],
)
def test_sudo_refusals_are_recognised(line: str, kind: str | None) -> None:
    found = classify_sudo_refusal([line])
    assert (found[1] if found else None) == kind


async def test_sudo_kill_ends_a_child_of_sudo_that_cannot_be_signalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real sudo (this test runs as root in CI, where `sudo -n kill` is allowed): SIGTERM and
    SIGKILL refused, no QMP monitor, so the last resort, `sudo -n kill -KILL`, must end it;
    sudo itself is never SIGKILLed first (its child would be orphaned)."""
    if os.geteuid() != 0:
        unavailable("needs root, for whom `sudo -n kill` needs no rule")
    sleep = shutil.which("sleep")
    assert sleep is not None
    with socket.socket(socket.AF_UNIX) as listener:
        argv = ["sudo", "-n", "--", sleep, "600"]  # root may not use -C without a Defaults
        process = await qemu_process.QemuProcess.start(argv, qmp_listener=listener)
    try:
        assert process.wrapped
        await wait_for(lambda: process.qemu_pids() != [], "sudo to start its child")
        (child,) = process.qemu_pids()
        refuse_signals(monkeypatch)
        info = await asyncio.wait_for(process.terminate(0), 20)
        assert info.returncode == -signal.SIGKILL
        assert child not in alive_pids()  # reaped by sudo, which then ended
    finally:
        monkeypatch.undo()
        process.kill_now()
        process.close_pipes()


def alive_pids() -> set[int]:
    return {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}


def gate_spawn(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """QEMU's spawn (Popen, in a worker thread) held until `proceed`; `spawning` once there."""
    spawning, proceed = threading.Event(), threading.Event()
    real_spawn = qemu_process.spawn

    def gated_spawn(*args: Any, **kwargs: Any) -> Any:
        spawning.set()
        proceed.wait(GUARD)
        return real_spawn(*args, **kwargs)

    monkeypatch.setattr(qemu_process, "spawn", gated_spawn)
    return spawning, proceed


def failures(published: list[pb.ClientStreamMessage]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (e.agent_event.event_type, json.loads(e.agent_event.details))
        for e in published
        if e.agent_event.status == "failed"
    ]


@pytest.mark.parametrize("then", ["stop", "nothing"])
async def test_a_cancelled_start_whose_qemu_nothing_stops_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The Run's caller goes away while QEMU is being spawned (Popen waits for the exec in a
    worker thread), and the QEMU it spawns cannot be signalled (root's, behind sudo without a
    kill rule); `stop`: a Stop follows. The start's clean-up gave up on that QEMU and only
    logged so: the Stop answered OK and the final event said `complete` (or `cancelled`)
    with it still running. Now the Stop answers FAILED_PRECONDITION naming its PID, as for a
    running VM's QEMU, the final event's error names it, and the VM is released all the
    same."""
    monkeypatch.setattr(sudo_stop, "GIVE_UP_AFTER", 0.5)
    spawning, proceed = gate_spawn(monkeypatch)
    async with running_manager(tmp_path, monkeypatch) as m:
        published: list[pb.ClientStreamMessage] = []
        m.service.bus.tap(published.append)
        run = m.stub.Run(run_request("c1"))
        stopping: asyncio.Future[Any] | None = None
        try:
            assert await asyncio.to_thread(spawning.wait, GUARD)
            refuse_signals(monkeypatch)
            start = m.service.computations()["c1"].start_task
            assert start is not None
            run.cancel()  # the Run's caller
            await wait_for(lambda: start.cancelling() > 0, "the start cancelled")
            if then == "stop":
                stopping = asyncio.ensure_future(
                    m.stub.Stop(pb.StopRequest(computation_id="c1"), timeout=GUARD)
                )
                await wait_for(
                    lambda: any(e.agent_event.event_type == "vm-stop" for e in published),
                    "the Stop's vm-stop starting",
                )
        finally:
            proceed.set()
        try:
            await wait_for(lambda: failures(published), "the final event")
            pid = vm_qemu(tmp_path)
            if stopping is not None:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stopping
                assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                details = failure.value.details() or ""
                assert f"pid {pid}" in details and "NOPASSWD" in details, details
            ((event_type, details),) = failures(published)
            assert event_type == ("vm-stop" if then == "stop" else "vm-provision")
            assert f"pid {pid}" in details["error"] and "stop_error" not in details, details
            assert list((await m.stub.List(pb.ListRequest())).computations) == []
        finally:
            await end_vm_qemu(tmp_path)


async def test_a_failed_start_whose_qemu_nothing_stops_keeps_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that fails on its own (QEMU's monitor never answers) and whose QEMU its
    clean-up cannot end: the Run answers the start's error, and so does the final event's
    `error` (the dial-out's answer is told by it); the QEMU left is its `stop_error`."""
    monkeypatch.setattr(sudo_stop, "GIVE_UP_AFTER", 0.5)
    env = {"FAKE_QEMU_MODE": "no-qmp", "MANAGER_QEMU_START_TIMEOUT": "1s"}
    async with running_manager(tmp_path, monkeypatch, **env) as m:
        published: list[pb.ClientStreamMessage] = []
        m.service.bus.tap(published.append)
        refuse_signals(monkeypatch)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await m.stub.Run(run_request("c1"), timeout=GUARD)
            assert "did not become ready within 1s" in (failure.value.details() or "")
            await wait_for(lambda: failures(published), "the final event")
            pid = vm_qemu(tmp_path)
            ((event_type, details),) = failures(published)
            assert event_type == "vm-provision"
            assert details["error"] == "QEMU did not become ready within 1s", details
            assert f"pid {pid}" in details["stop_error"], details
        finally:
            await end_vm_qemu(tmp_path)


async def test_a_start_failed_after_its_qemu_answered_keeps_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start fails once QEMU is ready (its RUNNING record meets a full state directory),
    so the release, not the start's clean-up, ends that QEMU, and cannot. The release put the
    stop failure in the final event's `error` over the start's own, which the Run answered
    and the dial-out's answer is told by; it is the `stop_error` now, as Get says too."""
    monkeypatch.setattr(sudo_stop, "GIVE_UP_AFTER", 0.5)
    async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_MODE="ignore-quit") as m:
        published: list[pb.ClientStreamMessage] = []
        m.service.bus.tap(published.append)
        store = m.service.ctx.store
        real_save = store.save

        def full_at_running(record: Any) -> None:
            if record.state == "running":
                refuse_signals(monkeypatch)  # and from here on, QEMU is root's
                raise OSError(errno.ENOSPC, "No space left on device")
            real_save(record)

        monkeypatch.setattr(store, "save", full_at_running)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await m.stub.Run(run_request("c1"), timeout=GUARD)
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await wait_for(lambda: failures(published), "the final event")
            pid = vm_qemu(tmp_path)
            ((event_type, details),) = failures(published)
            assert event_type == "vm-provision"
            assert details["error"] == failure.value.details(), details
            assert f"pid {pid}" in details["stop_error"], details
            got = await m.stub.Get(pb.GetRequest(computation_id="c1"))
            ended = got.last_exit
            assert ended.error == details["error"] and ended.stop_error == details["stop_error"]
            (left,) = [line for line in vm_report(got).splitlines() if "left running:" in line]
            assert f"pid {pid}" in left, left  # `cocos-manager-cli show`
        finally:
            await end_vm_qemu(tmp_path)
