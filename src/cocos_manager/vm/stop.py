"""How a VM's end is carried out and told: QEMU powered down or killed, and the details and
final event the release publishes.

Kept apart from vm/machine.py so the Machine reads as its transitions; these read the Machine
they are given and never change its state (`Machine._teardown` does, once, with what they
return).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from opentelemetry import trace

from cocos_manager.config import go_duration_text
from cocos_manager.errors import QemuStopFailedError
from cocos_manager.events import ConsoleLog
from cocos_manager.qemu import ExitInfo, QemuProcess, QmpClosed, QmpError
from cocos_manager.vm import ttl
from cocos_manager.vm.files import VmFiles
from cocos_manager.vm.lifecycle import EXIT, PROVISION, STOP, MachineContext, StopReason, VmState
from cocos_manager.vm.output import VmOutput
from cocos_manager.vm.resources import Lease

_tracer = trace.get_tracer("cocos_manager.machine")


class EndingVm(Protocol):
    """What these steps read and set of the Machine they end (vm/machine.py imports this module,
    never the other way)."""

    ctx: MachineContext
    process: QemuProcess | None
    expires_at: float | None
    halt: dict[str, Any] | None
    error: BaseException | None
    stop_failure: QemuStopFailedError | None
    log: Any
    state: VmState | None
    forced: asyncio.Event
    operator_paused: bool
    pausing: bool
    output: VmOutput
    files: VmFiles | None
    lease: Lease
    ttl_timer: ttl.Alarm | None
    console: ConsoleLog


def stop_details(machine: EndingVm, reason: StopReason) -> dict[str, Any]:
    """The STOPPING event's details: why, for a TTL the deadline, and how long the guest is
    given to power off when it is (`cocos-manager-cli stop` tells the operator)."""
    details: dict[str, Any] = {"reason": reason.value}
    if reason is StopReason.TTL and machine.expires_at is not None:
        details = ttl.stop_details(machine.expires_at)  # the deadline that ran out
    if machine.forced.is_set():
        details["force"] = True
    elif machine.state is VmState.RUNNING and (grace := powerdown_grace(machine)):
        details["powerdown_grace"] = go_duration_text(grace)
    return details


def powerdown_grace(machine: EndingVm) -> float:
    """Seconds the guest is given to power off on ACPI's power button; 0 = none: turned off,
    a forced Stop, a guest that cannot see the button (halted by QEMU, paused by Pause: it
    is not resumed to power off)."""
    process = machine.process
    if process is None or process.monitor is None or machine.forced.is_set():
        return 0.0
    if machine.halt is not None or machine.operator_paused or machine.pausing:
        return 0.0
    return machine.ctx.settings.qemu.POWERDOWN_GRACE


def release_details(machine: EndingVm, reason: StopReason) -> dict[str, Any]:
    """The RELEASED event's details, before what the end of QEMU adds. A QEMU that outlived
    a start's clean-up (could_not_stop) is named here: no QEMU is left for the release to end,
    and so to tell of."""
    details: dict[str, Any] = {"reason": reason.value}
    if machine.error is not None:
        details["error"] = str(machine.error)
    elif reason is StopReason.CLIENT:
        details["error"] = "cancelled"
    return details | left_running(machine)


class Unstoppable(Protocol):
    """What could_not_stop sets: a starting VM (vm/start.py) or an ending one."""

    stop_failure: QemuStopFailedError | None
    log: Any


def could_not_stop(machine: Unstoppable, error: QemuStopFailedError) -> None:
    """A QEMU of this VM outlived every way to end it: the release goes on (never STOPPING
    for ever), its final event says so (left_running), and a Stop answers with this error."""
    machine.stop_failure = error
    machine.log.error("QEMU could not be stopped", error=str(error))


def left_running(machine: EndingVm) -> dict[str, str]:
    """The final event's word on a QEMU that outlived the VM's end: its `error`, as a Stop's
    answer says, unless the start failed on its own. That error stays the `error` (the Run
    and the dial-out's answer, told by this event, report it) and the QEMU is the
    `stop_error`."""
    if machine.stop_failure is None:
        return {}
    key = "stop_error" if machine.error is not None else "error"
    return {key: str(machine.stop_failure)}


async def end_or_tell(
    machine: EndingVm, process: QemuProcess, reason: StopReason, *, ran: bool
) -> dict[str, Any]:
    """end_process, or the error of a QEMU that could not be stopped: never STOPPING for
    ever, the VM is released and the Stop told (FAILED_PRECONDITION). Then its agent's
    connections end: what they were acked for goes out before the final event."""
    try:
        details = await end_process(machine, process, reason, ran=ran)
    except QemuStopFailedError as error:
        could_not_stop(machine, error)
        details = left_running(machine)
    if (agents_ended := machine.ctx.end_agents(machine.lease.resources.guest_cid)) is not None:
        await agents_ended
    return details


def let_go(machine: EndingVm, process: QemuProcess | None) -> None:
    """Everything the VM holds but its record and its state: console reading, files, numbers,
    TTL timer, console (kept as an ended VM's)."""
    machine.output.note_suppressed()
    if process is not None:
        process.close_console()
    if machine.files is not None:
        machine.files.remove()
    machine.lease.release()
    if machine.ttl_timer is not None:
        machine.ttl_timer.cancel()
    machine.ctx.consoles.close(machine.console)


async def end_process(
    machine: EndingVm, process: QemuProcess, reason: StopReason, *, ran: bool
) -> dict[str, Any]:
    """QEMU ended for the release, and what the RELEASED event says of its end. `ran`: the VM
    reached RUNNING (a starting one is killed at once)."""
    if reason is StopReason.EXIT:
        await process.wait_output(0.2, keeper=False)  # its keeper: keeper_then
        info = process.exited.result()
        try:
            await process.end_outlived()  # sudo killed under a live QEMU
        except QemuStopFailedError as error:
            could_not_stop(machine, error)
        tail = process.tail()
        machine.log.warning("VM exited on its own", exit=info.describe(), last_lines=tail[-5:])
        ended = {"exit": info.describe(), "returncode": info.returncode, "last_lines": tail}
        return ended | left_running(machine)
    if ran:
        with _tracer.start_as_current_span("stop"):
            info = await power_off(machine, process)
        return {"exit": info.describe(), **(machine.halt or {})}
    process.close_pipes()
    process.kill_now()
    await process.terminate(0)
    return {}


async def power_off(machine: EndingVm, process: QemuProcess) -> ExitInfo:
    """ACPI power-down first when a grace is set (the guest shuts down cleanly), then
    SIGTERM, then SIGKILL after STOP_TIMEOUT. A forced Stop skips the grace, or ends the
    wait for it when it comes while the grace runs."""
    q = machine.ctx.settings.qemu
    if (grace := powerdown_grace(machine)) > 0 and process.monitor is not None:
        try:
            async with asyncio.timeout(2.0):
                await process.monitor.execute("system_powerdown")
            await _exit_or_force(machine, process, grace)
        except (TimeoutError, QmpClosed, QmpError) as error:
            if not process.exited.done():
                machine.log.info("guest did not power down in time", error=repr(error))
        else:
            if process.exited.done():
                machine.log.info("guest powered down", grace=grace)
            else:
                machine.log.info("forced stop: the power-down grace is cut short")
    return await process.terminate(q.STOP_TIMEOUT)


async def _exit_or_force(machine: EndingVm, process: QemuProcess, grace: float) -> None:
    """Until QEMU exits or a forced Stop comes; TimeoutError after `grace` seconds."""
    forced = asyncio.ensure_future(machine.forced.wait())
    try:
        done, _ = await asyncio.wait(
            (process.exited, forced), timeout=grace, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        forced.cancel()
    if not done:
        raise TimeoutError(f"no power-off in {go_duration_text(grace)}")


def keeper_then(process: QemuProcess | None, removal: asyncio.Future[None]) -> asyncio.Future[None]:
    """Done once the record is unlinked (`removal`) and QEMU's keeper has ended: what
    `Machine.released` (Stop's answer, the id's reuse) waits for after the final event. A
    QEMU that exited on its own has its keeper's end waited for here, not before `vm-exit`:
    the keeper's last record is read by then (all of QEMU's lines are out), and its exit
    came 0.4 ms median after that record, up to 1.5 (make bench, crash)."""
    if process is None:
        return removal

    async def both() -> None:
        await process.output.keeper_gone(0.2)
        await removal

    return asyncio.ensure_future(both())


def settle(released: asyncio.Future[None]) -> None:
    """`Machine.released` resolved, once the record's files are gone too."""
    if not released.done():
        released.set_result(None)


def final_event(machine: EndingVm, reason: StopReason) -> tuple[str, str]:
    """The RELEASED event's type and status: how the VM ended, as the client sees it."""
    if reason is StopReason.HALTED:
        return (EXIT, "failed")
    if reason is StopReason.EXIT:
        exited = machine.process is not None and machine.process.exited.done()
        ok = (
            exited
            and machine.process is not None
            and machine.process.exited.result().returncode == 0
        )
        return (EXIT, "complete" if ok else "failed")
    if machine.error is not None or reason in (StopReason.FAILED, StopReason.CLIENT):
        return (PROVISION, "failed")
    return (STOP, "failed" if machine.stop_failure is not None else "complete")
