"""The power button over QMP: a guest that handles it powers off within the grace; one that
does not, or a monitor that is gone, leaves the stop to SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cocos_manager.graceful_stop import PowerDownError, power_down, system_powerdown
from cocos_manager.qemu_process import qmp_args, qmp_listener
from cocos_manager.settings import QemuSettings, SettingsError, load_settings
from tests.support.harness import FAKE_QEMU


class Vm:
    def __init__(self, process: asyncio.subprocess.Process, qmp: Path) -> None:
        self.process = process
        self.qmp = qmp
        self.exited: asyncio.Future[int] = asyncio.ensure_future(process.wait())

    async def output(self) -> str:
        assert self.process.stdout is not None
        return (await self.process.stdout.read()).decode()


async def start_vm(tmp: Path, mode: str = "") -> Vm:
    """The stand-in QEMU with its QMP monitor on an inherited listening socket."""
    qmp = tmp / "qmp.sock"
    listener = qmp_listener(qmp)
    try:
        process = await asyncio.create_subprocess_exec(
            str(FAKE_QEMU), *qmp_args(listener),
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(listener.fileno(),), env={**os.environ, "FAKE_QEMU_MODE": mode},
        )  # fmt: skip
    finally:
        listener.close()
    assert process.stdout is not None
    assert b"BOOTED" in await asyncio.wait_for(process.stdout.readline(), 20)
    return Vm(process, qmp)


@pytest.fixture
async def vms() -> AsyncIterator[list[Vm]]:
    started: list[Vm] = []
    yield started
    for vm in started:
        if vm.process.returncode is None:
            vm.process.send_signal(signal.SIGKILL)
        await vm.exited


async def test_a_guest_that_handles_the_button_powers_off_in_the_grace(
    tmp_path: Path, vms: list[Vm]
) -> None:
    vm = await start_vm(tmp_path)
    vms.append(vm)
    began = time.monotonic()
    assert await power_down(vm.qmp, vm.exited, grace=10.0) is True
    assert time.monotonic() - began < 10.0
    assert vm.exited.result() == 0
    assert "reboot: Power down" in await vm.output()


async def test_a_guest_that_ignores_it_is_left_to_sigterm_after_the_grace(
    tmp_path: Path, vms: list[Vm]
) -> None:
    vm = await start_vm(tmp_path, "ignore-powerdown")
    vms.append(vm)
    began = time.monotonic()
    assert await power_down(vm.qmp, vm.exited, grace=0.5) is False
    assert time.monotonic() - began >= 0.5
    assert not vm.exited.done()  # still running: the caller's SIGTERM comes next


async def test_a_monitor_that_is_gone_is_no_error_for_the_stop(
    tmp_path: Path, vms: list[Vm]
) -> None:
    vm = await start_vm(tmp_path, "no-qmp")  # accepts nothing on the monitor
    vms.append(vm)
    assert await power_down(vm.qmp, vm.exited, grace=0.3) is False
    assert await power_down(tmp_path / "no-such.sock", vm.exited, grace=0.3) is False
    with pytest.raises(FileNotFoundError):
        await system_powerdown(tmp_path / "no-such.sock")


async def test_an_exited_vm_counts_as_powered_off(tmp_path: Path, vms: list[Vm]) -> None:
    vm = await start_vm(tmp_path)
    vms.append(vm)
    vm.process.send_signal(signal.SIGTERM)
    await vm.exited
    assert await power_down(vm.qmp, vm.exited, grace=5.0) is True


async def test_a_refused_command_is_a_powerdown_error(tmp_path: Path) -> None:
    path = tmp_path / "refusing.sock"

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        await reader.readline()
        writer.write(b'{"return": {}}\r\n{"event": "SOMETHING"}\r\n')
        writer.write(b'{"error": {"class": "GenericError", "desc": "no"}}\r\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(refuse, str(path))
    async with server:
        with pytest.raises(PowerDownError, match="QMP refused"):
            await system_powerdown(path)


def test_the_grace_is_off_by_default_and_a_go_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert QemuSettings().POWERDOWN_GRACE == 0.0
    monkeypatch.setenv("MANAGER_QEMU_POWERDOWN_GRACE", "1m30s")
    assert load_settings().qemu.POWERDOWN_GRACE == 90.0
    monkeypatch.setenv("MANAGER_QEMU_POWERDOWN_GRACE", "-1s")
    with pytest.raises(SettingsError, match=r"^invalid value for MANAGER_QEMU_POWERDOWN_GRACE"):
        load_settings()
