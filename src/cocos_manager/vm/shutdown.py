"""The daemon's shutdown as the VMs see it: announced, VMs still starting stopped at once, then
every VM stopped or left running for the next start, and the last word of each stream.

The service keeps the flags that refuse new work (vm-wide state is not its concern here); this
module carries out what those flags decide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from cocos_manager.events import notice_line, shutdown_notice
from cocos_manager.vm.lifecycle import MachineContext, StopReason, VmState
from cocos_manager.vm.machine import Machine


def announce_shutdown(ctx: MachineContext, computations: list[str]) -> None:
    """Subscribers hear it first (`manager-shutdown`/`starting`), so the vm-stop events that
    follow read as the shutdown's."""
    ctx.bus.publish(
        shutdown_notice(
            "starting",
            {
                "stops_vms": ctx.settings.service.SHUTDOWN_STOPS_VMS,
                "computations": computations,
            },
        )
    )


def stop_starting(ctx: MachineContext, machines: Iterable[Machine]) -> None:
    """VMs still starting are stopped now: no client could use a VM that becomes ready while
    the daemon stops, and the in-flight grace would otherwise be spent waiting for it."""
    for machine in list(machines):
        if machine.state in (VmState.ADMITTED, VmState.STARTING):
            ctx.tasks.spawn(machine.stop(StopReason.SHUTDOWN), name=f"stop:{machine.id}")


async def stop_or_leave(machines: Sequence[Machine], stop_vms: bool) -> None:
    """Every VM stopped, or (MANAGER_SHUTDOWN_STOPS_VMS=false) let go of: its TTL timer, QMP
    session and pidfd, for the next start to adopt."""
    if stop_vms:
        await asyncio.gather(
            *(m.stop(StopReason.SHUTDOWN) for m in machines), return_exceptions=True
        )
        return
    for machine in machines:
        if machine.ttl_timer is not None:  # the next start re-arms it from the record
            machine.ttl_timer.cancel()
        if machine.state in (VmState.RUNNING, VmState.PAUSED):
            machine.log.info(
                "VM left running for the next start (MANAGER_SHUTDOWN_STOPS_VMS=false)",
                state=machine.state.value,
                **machine.details(),
            )
            if machine.process is not None:
                await machine.process.detach()


def end_streams(ctx: MachineContext, left_running: list[str]) -> None:
    """The last word of every Events stream (`manager-shutdown`/`complete`, naming the VMs left
    running), which then ends once its queue is sent; and of every Logs follower of a VM left
    running."""
    ctx.bus.close(shutdown_notice("complete", {"left_running": left_running}))
    ctx.consoles.end_followers(
        notice_line(
            "the manager is shutting down and leaves this VM running; "
            "follow it again once the manager is back"
        )
    )
