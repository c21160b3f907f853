"""The steps of one start attempt that do not change the VM's state: its files, its command
line, the manifest hand-over to the agent, and the numbers failed attempts found taken.

Kept apart from vm/machine.py so the Machine reads as its transitions; each step works on the
Machine it is given (its settings, lease and files) and raises the error its caller answers.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

from opentelemetry import trace

from cocos_manager.agent import AgentSettings, HandoverAborted, HandoverTimeout, send_manifest
from cocos_manager.confidential import LaunchMode, launch_mode, launched_binding
from cocos_manager.config import env_values
from cocos_manager.errors import (
    HandoverFailedError,
    HandoverTimeoutError,
    ManagerError,
    QemuExitedError,
    QemuStopFailedError,
    mark_told,
)
from cocos_manager.events import manager_event
from cocos_manager.host import outlast, start_pool
from cocos_manager.qemu import (
    Conflict,
    QemuProcess,
    VmResources,
    VmSize,
    conflicts_exhausted,
    cvm_args,
    derive_vm_settings,
    qemu_environment,
    qmp_args,
    vm_args,
)
from cocos_manager.vm import stop as vm_stop
from cocos_manager.vm import ttl
from cocos_manager.vm.files import (
    CERTS_SUBDIR,
    ENV_SUBDIR,
    VmFiles,
    WouldCopy,
    prepare_vm_files,
    shares_dir,
    write_shares,
)
from cocos_manager.vm.launch import Launch, launch_of
from cocos_manager.vm.lifecycle import PROVISION, START_ATTEMPTS, MachineContext, StopReason
from cocos_manager.vm.output import VmOutput
from cocos_manager.vm.resources import Lease

_tracer = trace.get_tracer("cocos_manager.machine")


class StartingVm(Protocol):
    """What these steps read and set of the Machine they start (vm/machine.py imports this
    module, never the other way)."""

    ctx: MachineContext
    files: VmFiles | None
    lease: Lease
    log: Any
    launch: dict[str, Any] | None
    agent_settings: AgentSettings | None
    size: VmSize
    launch_settings: dict[str, str]
    id: str
    process: QemuProcess | None
    stop_failure: QemuStopFailedError | None
    output: VmOutput
    expires_at: float | None
    ttl_timer: ttl.Alarm | None

    async def stop(self, reason: StopReason, *, force: bool = False) -> None: ...

    @property
    def uuid(self) -> str: ...
    @property
    def resources(self) -> VmResources: ...
    @property
    def fw_cfg(self) -> bool: ...


def details(machine: StartingVm) -> dict[str, Any]:
    """What each of the VM's events and log lines names it by: its numbers and its QEMU."""
    r = machine.resources
    details: dict[str, Any] = {"agent_port": r.host_port, "vnc_display": r.vnc_display}
    if not machine.fw_cfg:
        details["guest_cid"] = r.guest_cid
    if machine.process is not None:
        details["pid"] = machine.process.pid
        details.update(launched_binding(machine.process.argv))  # host_data / mrconfigid
    return details


def tell_admission_failed(machine: StartingVm, error: ManagerError) -> None:
    """The record could not be written (a full MANAGER_STATE_DIR): a failed start like any
    other, told on Events (and up the dial-out) as vm-provision starting/failed."""
    machine.log.warning("computation failed to start", error=str(error))
    failed = {"reason": StopReason.FAILED.value, "error": str(error)}
    machine.ctx.bus.publish(manager_event(machine.id, PROVISION, "starting", None))
    machine.ctx.bus.publish(manager_event(machine.id, PROVISION, "failed", failed))
    mark_told(error, True)


async def launch(machine: StartingVm, argv: list[str], listener: socket.socket) -> QemuProcess:
    """This attempt's QEMU spawned, its output to the VM's lines (through its console keeper)."""
    assert machine.files is not None
    return await machine.ctx.launch(
        argv,
        qmp_listener=listener,
        on_line=machine.output.line,
        env=qemu_environment(machine.ctx.settings.qemu),
        console=machine.files.console(machine.ctx.settings.service.CONSOLE_FILE_BYTES),
        on_keeper_lost=machine.output.lost,
        on_unstoppable=lambda error: vm_stop.could_not_stop(machine, error),
    )


async def reap_attempt(machine: StartingVm, process: QemuProcess) -> None:
    """The per-attempt guard: this attempt's QEMU is gone before anything is reused. Shielded,
    so a second cancellation cannot leave it running; the release reaps it again if so."""
    process.close_pipes()
    process.kill_now()
    try:
        await asyncio.shield(process.terminate(0))
    except QemuStopFailedError as error:  # the start's own error is the one to answer
        vm_stop.could_not_stop(machine, error)
    if machine.process is process:
        machine.process = None


def arm_ttl(machine: StartingVm) -> None:
    """The TTL's alarm (vm/ttl.py), which stops the VM when its deadline comes."""
    if machine.expires_at is not None:
        machine.ttl_timer = ttl.arm(
            machine.expires_at,
            lambda: machine.ctx.tasks.spawn(machine.stop(StopReason.TTL), name=f"ttl:{machine.id}"),
        )


def follow_console(machine: StartingVm, process: QemuProcess) -> None:
    """For a re-adopted VM: QEMU's lines from before the restart, then the new ones (none from
    a directory the daemon may not use: nothing there is read, recovery.py)."""
    if machine.files is not None and "console" in machine.files.paths:
        files = machine.files.console(machine.ctx.settings.service.CONSOLE_FILE_BYTES)
        process.output.on_keeper_lost = machine.output.lost
        process.output.follow_console(
            files, machine.output.line, machine.output.history, process.start_time
        )


async def prepare_files(machine: StartingVm, manifest: bytes) -> None:
    """On the loop when kernel and rootfs can be hard-linked (the usual case: a few system
    calls, and no thread hop, which in a burst of 32 Runs was the costlier part); else in
    a worker thread, which a cancelled Run cannot interrupt: on cancellation the files it
    still makes are removed once it ends."""
    q = machine.ctx.settings.qemu
    vm_manifest = manifest if machine.fw_cfg and machine.agent_settings is None else None
    with _tracer.start_as_current_span("prepare-files"):
        try:
            machine.files = prepare_vm_files(q, machine.uuid, vm_manifest, copy_shared=False)
        except WouldCopy:
            preparing = asyncio.get_running_loop().run_in_executor(
                start_pool, prepare_vm_files, q, machine.uuid, vm_manifest
            )
            try:
                machine.files = await asyncio.shield(preparing)
            except asyncio.CancelledError:
                await outlast(preparing)  # a Stop's cancellation too: the files are named
                if not preparing.cancelled() and preparing.exception() is None:
                    machine.files = preparing.result()
                raise
        agent = machine.agent_settings
        if agent is not None:
            # Named before it is made: the release removes it however the start ends.
            machine.files.shares = shares_dir(q, machine.uuid)
            write_shares(q, machine.uuid, agent.certs, agent.environment)


async def note_launch(machine: StartingVm) -> None:
    """What the VM is launched with, for AttestationPolicy (launch.py), before its QEMU is
    spawned (the record naming that QEMU carries it): a CreateVm'd VM's kernel command line
    with its own parameter. Hashing firmware, kernel and initrd takes a worker thread, so
    only a confidential launch pays it."""
    q = derive_vm_settings(machine.ctx.settings.qemu, machine.resources, machine.size)
    agent = machine.agent_settings
    if agent is not None and agent.kernel_parameter:
        q = q.model_copy(update={"KERNEL_CMDLINE": f"{q.KERNEL_CMDLINE} {agent.kernel_parameter}"})
    if launch_mode(q) is LaunchMode.NONE:
        machine.launch = Launch(LaunchMode.NONE).to_record()
        return
    loop = asyncio.get_running_loop()
    launch = await loop.run_in_executor(start_pool, launch_of, q)
    machine.launch = launch.to_record()


def needs_handover(machine: StartingVm) -> bool:
    """Whether the agent is handed the manifest over vsock: a Run on the vsock channel (a
    CreateVm'd VM's agent fetches its work itself)."""
    return not machine.fw_cfg and machine.agent_settings is None


def vm_command(machine: StartingVm, listener: socket.socket, payload: bytes) -> list[str]:
    """`payload`: the manifest (a CreateVm'd VM: its environment file), bound into
    attestation with MANAGER_QEMU_BIND_MANIFEST. The settings the line is built from are kept
    with it (Get shows them)."""
    assert machine.files is not None
    q = machine.ctx.settings.qemu
    machine.launch_settings = env_values(derive_vm_settings(q, machine.resources, machine.size))
    agent = machine.agent_settings
    if agent is not None:
        assert machine.files.shares is not None
        args = cvm_args(
            machine.ctx.settings.qemu,
            machine.resources,
            certs_dir=machine.files.shares / CERTS_SUBDIR,
            env_dir=machine.files.shares / ENV_SUBDIR,
            kernel_parameter=agent.kernel_parameter,
            payload=payload,
            size=machine.size,
        )
    else:
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


async def handover(machine: StartingVm, process: QemuProcess, manifest: bytes) -> None:
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
        self, machine: StartingVm, conflict: Conflict, attempt: int, error: QemuExitedError
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
