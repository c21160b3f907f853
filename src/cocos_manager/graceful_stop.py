"""A graceful stop: press the VM's ACPI power button and give the guest a grace to power off.

The original stopped a VM with SIGTERM, which QEMU takes as pulling the plug: the guest gets
no chance to flush its disks or tell anyone. With MANAGER_QEMU_POWERDOWN_GRACE set, a Stop
first sends QMP `system_powerdown` (what `virsh shutdown` does) and waits that long for QEMU
to exit by itself; only then does it fall back to SIGTERM, then SIGKILL after STOP_TIMEOUT.
Unset or 0 keeps the original's SIGTERM.

The daemon's own stop path (`Machine._terminate`) does this through the QMP session it keeps
for each VM, since QEMU's monitor serves one client at a time. This module opens a connection
of its own: for a QEMU nobody holds a session to (the test guest's power-button test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

from cocos_manager.logging import get_logger
from cocos_manager.vm_files import unix_socket_path

_log = get_logger()
QMP_TIMEOUT = 5.0
_QMP_LINE_LIMIT = 1 << 20


class PowerDownError(Exception):
    """The power button could not be pressed (monitor gone, not QMP, command refused)."""


async def _reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next greeting or command reply; asynchronous events in between are skipped."""
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise PowerDownError("QEMU closed its QMP monitor")
        try:
            message = json.loads(line)
        except ValueError:
            raise PowerDownError(f"not QMP: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise PowerDownError(f"not QMP: {line[:200]!r}")
        if "event" in message:
            continue
        if "error" in message:
            raise PowerDownError(f"QMP refused: {message['error']}")
        return message


async def system_powerdown(qmp_path: Path) -> None:
    """Presses the ACPI power button through the VM's QMP monitor (greeting,
    qmp_capabilities, system_powerdown). Returns once QEMU accepted the command; the guest
    decides what to do with it."""
    with unix_socket_path(qmp_path) as address:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, address)
            reader, writer = await asyncio.open_connection(sock=sock, limit=_QMP_LINE_LIMIT)
        except BaseException:
            sock.close()
            raise
    try:
        writer.write(b'{"execute":"qmp_capabilities"}\n{"execute":"system_powerdown"}\n')
        await _reply(reader)  # the greeting
        await _reply(reader)  # capabilities accepted
        await _reply(reader)  # the button was pressed
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def power_down(qmp_path: Path, exited: asyncio.Future[Any], grace: float) -> bool:
    """Presses the power button and waits up to `grace` seconds for QEMU to exit.

    True if it exited within the grace (a clean guest shutdown). False if the button could
    not be pressed or the guest did not power off in time: the caller goes on to SIGTERM.
    Never raises for a VM that is misbehaving; cancelling it cancels the wait only.
    """
    if exited.done():
        return True
    try:
        await asyncio.wait_for(system_powerdown(qmp_path), min(grace, QMP_TIMEOUT))
    except (OSError, TimeoutError, PowerDownError) as error:
        if exited.done():  # it went away while we knocked: as good as powered off
            return True
        _log.warning("power button not pressed; stopping with SIGTERM", error=str(error))
        return False
    try:
        await asyncio.wait_for(asyncio.shield(exited), grace)
    except TimeoutError:
        return False
    return True
