"""The test guest handles the ACPI power button, as a guest OS the graceful stop relies on does.

Why this exists (graceful stop): a Stop that first asks the guest to power down
(QMP `system_powerdown`) can only be shown working with a guest that reacts to the power
button. This drives the guest itself, with no daemon: real QEMU under TCG with OVMF and the
e2e tests' settings, a QMP socket of its own, `system_powerdown` (qmp.QmpMonitor,
what a graceful Stop does) once the guest serves, and then the guest's own marker line and
QEMU's exit status 0 within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import pytest

from cocos_manager.config.settings import QemuSettings
from cocos_manager.qemu.argv import qemu_args
from cocos_manager.qemu.qmp import QmpMonitor
from tests.e2e.test_real_vm import BOOT_TIMEOUT, guest_images

POWER_BUTTON_MARKER = "cocos-test: power button, shutting down"
# The guest powers off at once on the button; TCG on a busy 2-core machine is slow.
POWERDOWN_GRACE = 15.0

pytestmark = pytest.mark.timeout(300)


def guest_settings(tmp: Path) -> QemuSettings:
    """The e2e tests' settings (TCG, max CPU, one vCPU, 512M, OVMF, no vsock device)."""
    kernel, rootfs = guest_images()
    vars_copy = tmp / "OVMF_VARS.fd"
    shutil.copyfile(QemuSettings().OVMF_VARS_FILE, vars_copy)  # pflash unit 1 is written to
    return QemuSettings(
        ENABLE_KVM=False,
        ENABLE_SEV_SNP=False,
        CPU="max",
        SMP_COUNT=1,
        MEMORY_SIZE="512M",
        DISK_IMG_KERNEL_FILE=str(kernel),
        DISK_IMG_ROOTFS_FILE=str(rootfs),
        OVMF_VARS_FILE=str(vars_copy),
        HOST_FWD_AGENT=0,  # slirp binds a port of the kernel's pick: nothing to collide with
        NETDEV_ID="ops-net",
    )


def argv(settings: QemuSettings, qmp: Path) -> list[str]:
    args = qemu_args(settings, vsock_device=False)
    args[args.index("-vnc") + 1] = "none"  # no display needed, none to collide with
    return [
        shutil.which(settings.BIN_PATH) or settings.BIN_PATH,
        *args,
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]


async def read_until(stream: asyncio.StreamReader, text: str, seen: list[str]) -> None:
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"QEMU's output ended before {text!r}; last lines: {seen[-20:]}")
        line = raw.decode(errors="replace").strip()
        seen.append(line)
        if text in line:
            return


async def test_system_powerdown_makes_the_guest_power_off_cleanly(tmp_path: Path) -> None:
    qmp = tmp_path / "qmp.sock"
    process = await asyncio.create_subprocess_exec(
        *argv(guest_settings(tmp_path), qmp),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    exited = asyncio.ensure_future(process.wait())
    seen: list[str] = []
    try:
        # No manifest in fw_cfg: the guest's id is empty, so it prints "SERVING " when ready.
        await asyncio.wait_for(read_until(process.stdout, "SERVING", seen), BOOT_TIMEOUT)
        assert POWER_BUTTON_MARKER not in "\n".join(seen)
        assert process.returncode is None

        pressed = time.monotonic()
        monitor = await QmpMonitor.connect(qmp)  # the daemon's own QMP client (qemu/qmp.py)
        try:
            await monitor.execute("system_powerdown")
            await asyncio.wait_for(asyncio.shield(exited), POWERDOWN_GRACE)
        finally:
            await monitor.close()
        took = time.monotonic() - pressed
        # QEMU exited: the rest of its output is in the pipe.
        await asyncio.wait_for(read_until(process.stdout, POWER_BUTTON_MARKER, seen), 5)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await exited
    assert exited.result() == 0, seen[-20:]
    assert took < POWERDOWN_GRACE
    print(f"power button to QEMU exit: {took:.2f} s")
