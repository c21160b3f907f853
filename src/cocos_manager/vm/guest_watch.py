"""QEMU's own word on the guest: its QMP events turned into "halted" or "running again".

As libvirt does, a guest QEMU stopped (a panic, an internal error, a shutdown with
-no-shutdown) is not a running VM. Kept apart from the Machine so the lifecycle reads as
transitions only: this watcher decides *that* the guest halted or resumed, and calls back into
its Machine, which alone changes the state (pausing it, or stopping it, per
MANAGER_QEMU_ON_GUEST_HALT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine
from typing import Any, Protocol

from cocos_manager.config import GuestHaltAction
from cocos_manager.qemu import QemuProcess
from cocos_manager.vm.lifecycle import HALT_STATES, MachineContext, StopReason, VmState


class WatchedVm(Protocol):
    """What the watcher reads of its Machine and the transitions it asks of it (vm/machine.py
    imports this module, never the other way)."""

    id: str
    ctx: MachineContext
    state: VmState | None
    process: QemuProcess | None
    halt: dict[str, Any] | None
    log: Any

    def paused(self, details: dict[str, Any]) -> None: ...
    def resumed(self) -> None: ...
    def stop(self, reason: StopReason) -> Coroutine[Any, Any, None]: ...


class GuestWatch:
    """One per Machine; events of a QEMU the Machine no longer owns (a failed attempt's)
    are ignored."""

    def __init__(self, machine: WatchedVm) -> None:
        self._machine = machine

    def watch(self, process: QemuProcess) -> None:
        if process.monitor is not None:
            process.monitor.on_event = lambda event: self._on_qmp_event(process, event)

    def _on_qmp_event(self, process: QemuProcess, event: dict[str, Any]) -> None:
        """As libvirt does: a guest QEMU stopped is not a running VM."""
        machine = self._machine
        name, data = event.get("event"), event.get("data") or {}
        if machine.process is not process:
            return
        machine.log.info("QEMU event", qmp_event=name, data=data)
        if name == "GUEST_PANICKED":
            self._halted({"qemu_status": "guest-panicked", "qemu_event": name, "info": data})
        elif name == "STOP":
            machine.ctx.tasks.spawn(self._check_halt(process), name=f"qmp-status:{machine.id}")
        elif name == "RESUME" and machine.state is VmState.PAUSED:
            machine.resumed()

    async def _check_halt(self, process: QemuProcess) -> None:
        machine = self._machine
        if process.monitor is None:
            return
        with contextlib.suppress(Exception):  # QEMU gone meanwhile: its exit tells the rest
            status = await process.monitor.query_status()
            if status in HALT_STATES and machine.process is process:
                self._halted({"qemu_status": status, "qemu_event": "STOP"})

    def _halted(self, details: dict[str, Any]) -> None:
        machine = self._machine
        if machine.state is not VmState.RUNNING:
            return  # starting: the start path fails on its own; stopping: already going
        machine.halt = details
        machine.log.warning("QEMU halted the guest", **details)
        if machine.ctx.settings.qemu.ON_GUEST_HALT is GuestHaltAction.KEEP:
            machine.paused(details)
        else:
            machine.ctx.tasks.spawn(machine.stop(StopReason.HALTED), name=f"halted:{machine.id}")
