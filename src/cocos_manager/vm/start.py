"""The steps of one start attempt that do not change the VM's state: its files, its command
line, the manifest hand-over to the agent, and the numbers failed attempts found taken.

Kept apart from machine.py so the Machine reads as its transitions; each step works on the
Machine it is given (its settings, lease and files) and raises the error its caller answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING

from opentelemetry import trace

from cocos_manager.agent.vsock import HandoverAborted, HandoverTimeout, send_manifest
from cocos_manager.config.env_text import env_values
from cocos_manager.errors import HandoverFailedError, HandoverTimeoutError, QemuExitedError
from cocos_manager.host import workers
from cocos_manager.qemu.argv import VmResources, derive_vm_settings, vm_args
from cocos_manager.qemu.failures import Conflict, conflicts_exhausted
from cocos_manager.qemu.process import QemuProcess
from cocos_manager.qemu.qmp import qmp_args
from cocos_manager.vm.files import WouldCopy, prepare_vm_files
from cocos_manager.vm.lifecycle import START_ATTEMPTS

if TYPE_CHECKING:
    from cocos_manager.vm.machine import Machine

_tracer = trace.get_tracer("cocos_manager.machine")


async def prepare_files(machine: Machine, manifest: bytes) -> None:
    """On the loop when kernel and rootfs can be hard-linked (the usual case: a few system
    calls, and no thread hop, which in a burst of 32 Runs was the costlier part); else in
    a worker thread, which a cancelled Run cannot interrupt: on cancellation the files it
    still makes are removed once it ends."""
    q = machine.ctx.settings.qemu
    vm_manifest = manifest if machine.fw_cfg else None
    with _tracer.start_as_current_span("prepare-files"):
        try:
            machine.files = prepare_vm_files(q, machine.uuid, vm_manifest, copy_shared=False)
            return
        except WouldCopy:
            pass
        preparing = asyncio.get_running_loop().run_in_executor(
            workers.pool, prepare_vm_files, q, machine.uuid, vm_manifest
        )
        try:
            machine.files = await asyncio.shield(preparing)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                machine.files = await preparing
            raise


def vm_command(machine: Machine, listener: socket.socket, payload: bytes) -> list[str]:
    """`payload`: the manifest, bound into attestation with MANAGER_QEMU_BIND_MANIFEST. The
    settings the line is built from are kept with it (Get shows them)."""
    assert machine.files is not None
    q = machine.ctx.settings.qemu
    machine.launch_settings = env_values(derive_vm_settings(q, machine.resources, machine.size))
    args = vm_args(
        machine.ctx.settings.qemu,
        machine.resources,
        manifest_file=machine.files.manifest,
        manifest=payload,
        size=machine.size,
    )
    return machine.ctx.executable.vm_command(
        [*args, *qmp_args(listener)], keep_fds=(listener.fileno(),)
    )


async def handover(machine: Machine, process: QemuProcess, manifest: bytes) -> None:
    """The manifest to the agent over vsock; a QEMU that exits meanwhile ends it at once, with
    QEMU's own words."""
    timeout = machine.ctx.settings.qemu.START_TIMEOUT
    try:
        await send_manifest(
            machine.ctx.agent_connector(machine.resources.guest_cid),
            manifest,
            abort=process.exited,
            timeout=timeout,
        )
    except HandoverAborted:
        raise await process.exited_at_start("before the agent took the manifest") from None
    except HandoverTimeout as error:
        raise HandoverTimeoutError(str(error)) from None
    except Exception as error:
        raise HandoverFailedError(f"manifest hand-over to the agent failed: {error}") from None


class TakenNumbers:
    """A start attempt that found its port, display or CID taken gets another number and is
    tried again; once every attempt hit one, the error names each number found taken."""

    def __init__(self) -> None:
        self._taken: list[tuple[Conflict, int]] = []

    def swap(
        self, machine: Machine, conflict: Conflict, attempt: int, error: QemuExitedError
    ) -> None:
        self._taken.append((conflict, taken_number(machine.resources, conflict)))
        if attempt == START_ATTEMPTS:
            if conflict is Conflict.GUEST_CID:  # as swap() would
                machine.ctx.pools.cids.shun(machine.resources.guest_cid)
            raise conflicts_exhausted(self._taken, START_ATTEMPTS) from error
        machine.log.warning(
            "VM start hit a taken resource; retrying",
            attempt=attempt,
            conflict=conflict.value,
            error=str(error),
        )
        machine.lease.swap(conflict)


def taken_number(resources: VmResources, conflict: Conflict) -> int:
    """The number QEMU found taken, named in the error once every attempt hit one."""
    r = resources
    if conflict is Conflict.HOST_PORT:
        return r.host_port
    return r.vnc_display if conflict is Conflict.VNC_DISPLAY else r.guest_cid
