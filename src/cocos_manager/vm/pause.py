"""Pause and Resume: the guest frozen and thawed by QEMU (QMP `stop` / `cont`, as virsh
suspend / resume), its QEMU, numbers and files kept.

A paused VM is the state QEMU's own halt already has (PAUSED, vm-paused / vm-resumed), told
apart by `Machine.operator_paused`. Each request runs in a task of its own that the caller
awaits shielded: a caller that goes away mid-command cannot leave QEMU paused while the state
says running. Asking for the state a VM is already in succeeds and publishes nothing
(retries are safe); docs/decisions.md, "Pause and resume".
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from cocos_manager.errors import FailedPreconditionError, UnavailableError
from cocos_manager.qemu import QmpClosed, QmpError
from cocos_manager.vm.lifecycle import VmState

if TYPE_CHECKING:
    from cocos_manager.vm.machine import Machine

QMP_COMMAND_TIMEOUT = 10.0
"""A QEMU that does not answer `stop` or `cont` in this long is wedged: the request fails."""


async def pause_vm(machine: Machine) -> None:
    if machine.state is VmState.PAUSED:
        return
    _check_state(machine, VmState.RUNNING, "paused")
    await _shielded(machine, _pause(machine), "pause")


async def resume_vm(machine: Machine) -> None:
    if machine.state is VmState.RUNNING:
        return
    _check_state(machine, VmState.PAUSED, "resumed")
    await _shielded(machine, _resume(machine), "resume")


def _check_state(machine: Machine, wanted: VmState, verb: str) -> None:
    if machine.state is not wanted:
        state = machine.state.value if machine.state else "admitted"
        raise FailedPreconditionError(
            f"computation {machine.id!r} is {state}: only a {wanted.value} VM can be {verb}"
        )


async def _shielded(machine: Machine, work: Coroutine[Any, Any, None], verb: str) -> None:
    """The command and its state change, whole, even if the caller is cancelled in between."""
    task = asyncio.get_running_loop().create_task(work, name=f"{verb}:{machine.id}")
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # Nobody will read its outcome: retrieved here, so it is not logged as lost.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise


async def _command(machine: Machine, command: str) -> None:
    process = machine.process
    if process is None or process.monitor is None:
        raise FailedPreconditionError(f"computation {machine.id!r} has no QEMU monitor")
    try:
        async with asyncio.timeout(QMP_COMMAND_TIMEOUT):
            await process.monitor.execute(command)
    except QmpError as error:
        raise FailedPreconditionError(
            f"computation {machine.id!r}: QEMU refused {command!r}: {error}"
        ) from None
    except (QmpClosed, TimeoutError) as error:
        if machine.state in (VmState.STOPPING, VmState.RELEASED):  # QEMU ended by a Stop
            raise FailedPreconditionError(f"computation {machine.id!r} is being stopped") from None
        raise UnavailableError(
            f"computation {machine.id!r}: QEMU did not answer {command!r} ({error!r})"
        ) from None


async def _pause(machine: Machine) -> None:
    """While QMP `stop` is in flight, and after it if a Stop came meanwhile, the guest is
    (being) frozen: a release gives it no power-down grace it could not use."""
    machine.pausing = True
    try:
        await _command(machine, "stop")
    finally:
        machine.pausing = False
    if machine.state is VmState.RUNNING:
        machine.paused_by_operator({"reason": "pause"})
    elif machine.state is not VmState.PAUSED:  # a Stop came meanwhile; QEMU paused anyway
        machine.operator_paused = True
        raise FailedPreconditionError(f"computation {machine.id!r} is being stopped")


async def _resume(machine: Machine) -> None:
    await _command(machine, "cont")
    # QEMU's RESUME event usually comes first and guest_watch moves the state; if not, here.
    if machine.state is VmState.PAUSED:
        machine.resumed()
    elif machine.state is not VmState.RUNNING:
        raise FailedPreconditionError(f"computation {machine.id!r} is being stopped")
