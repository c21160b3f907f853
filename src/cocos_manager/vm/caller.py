"""A VM's start on behalf of one caller (Run, CreateVm): the caller going away (a cancel, a
deadline) is told apart from the start failing, and a VM nobody will hear of is stopped.

The start runs in a task of its own, so a cancelled caller never interrupts a step half-way:
the start is cancelled and releases the VM through the one teardown path (vm/machine.py)."""

from __future__ import annotations

import asyncio
import contextlib

from cocos_manager.errors import AbortedError, ManagerError, UnavailableError
from cocos_manager.telemetry import METRICS
from cocos_manager.vm.lifecycle import StopReason
from cocos_manager.vm.machine import Machine


def failure_reason(error: BaseException) -> str:
    """The label of manager_run_failures_total: each error type names its own."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, ManagerError):
        return error.reason
    return "internal"


async def start_to_running(machine: Machine, payload: bytes) -> None:
    """`machine` from ADMITTED to RUNNING for a caller that waits for it; if that caller goes
    away, the VM is stopped and nothing is left behind."""
    computation_id = machine.id
    start = asyncio.get_running_loop().create_task(
        machine.start(payload), name=f"start:{computation_id}"
    )
    machine.start_task = start
    try:
        await asyncio.shield(start)
    except asyncio.CancelledError:
        METRICS.run_failures.labels(reason="cancelled").inc()
        if not start.done():  # our caller went away (client cancel, deadline)
            start.cancel()
            start.add_done_callback(lambda _: stop_unheard(machine, start))
            with contextlib.suppress(BaseException):
                await start
            raise
        if not start.cancelled():
            if (stopping := stop_unheard(machine, start)) is not None:  # ready in that instant
                await asyncio.shield(stopping)
            raise
        if machine.stop_reason is StopReason.SHUTDOWN:
            raise UnavailableError(
                f"the manager is shutting down: the VM of computation {computation_id!r} "
                "was stopped while starting"
            ) from None
        raise AbortedError(
            f"computation {computation_id!r} was stopped while its VM was starting"
        ) from None
    except Exception as error:
        METRICS.run_failures.labels(reason=failure_reason(error)).inc()
        raise


def stop_unheard(machine: Machine, start: asyncio.Task[None]) -> asyncio.Task[None] | None:
    """A start whose caller went away that reached RUNNING all the same (in the instant the
    caller left, or past a cancellation a step did not pass on): nobody will ever hear of its
    VM, so it is stopped, in a task of the daemon's (the shutdown waits for it)."""
    if start.cancelled() or start.exception() is not None:
        return None
    return machine.ctx.tasks.spawn(machine.stop(StopReason.CLIENT), name=f"unheard:{machine.id}")
