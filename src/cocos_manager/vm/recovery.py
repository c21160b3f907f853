"""After a restart: re-adopt the VMs an earlier run of the daemon left running, clean the rest.

As libvirt does on reconnect, and stricter: a VM is kept only if its Run had answered, its
process is provably the recorded one (PID, start time and command line — a PID alone can be
reused) and its QMP monitor still answers. On any doubt the VM is killed and its files and
record removed rather than risk a VM nobody tracks. See docs/decisions.md, "Restarts".

Nothing is signalled on a record's word alone: a record of another boot (its PID and start
time belong to a process table that no longer exists) is cleaned without signalling, and a
process is signalled only when its start time matches and its command line is the one the
daemon exec'd (for a "starting" record: the same QEMU arguments, a wrapper may have exec'd).
Paths come from the validated UUID and the settings, never from the record.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from cocos_manager.errors import FailedPreconditionError, QemuStopFailedError
from cocos_manager.host.state_store import (
    VmRecord,
    current_boot_id,
    live_processes,
    process_identity,
)
from cocos_manager.qemu.argv import VmResources
from cocos_manager.qemu.process import QemuProcess
from cocos_manager.telemetry.logging import get_logger
from cocos_manager.vm.files import VmFiles, vm_paths
from cocos_manager.vm.lifecycle import MachineContext, VmState
from cocos_manager.vm.listing import started_at_from_ticks
from cocos_manager.vm.machine import Machine
from cocos_manager.vm.output import keep_post_mortem

_log = get_logger()


async def recover(ctx: MachineContext, machines: dict[str, Machine]) -> None:
    """Adopted VMs are added to `machines`; everything else of the records is removed."""
    try:
        ctx.store.open()
    except OSError as error:
        raise FailedPreconditionError(
            f"MANAGER_STATE_DIR: cannot create {str(ctx.store.directory)!r}: {error.strerror}"
        ) from None
    # Two records may claim one computation id (never written so, but files can be edited):
    # the first one adopted wins, so adopt one id at a time.
    by_id: dict[str, list[VmRecord]] = {}
    for record in ctx.store.load_all():
        by_id.setdefault(record.computation_id, []).append(record)

    async def recover_id(group: list[VmRecord]) -> None:
        for record in group:
            try:
                machine = await _recover_one(ctx, record, taken=record.computation_id in machines)
            except Exception as error:  # never a traceback nor a restart loop over one record
                _log.error(
                    "VM record could not be recovered; dropped without signalling",
                    computation_id=record.computation_id,
                    pid=record.pid,
                    error=repr(error),
                )
                _files(ctx, record).remove()
                ctx.store.remove(record.uuid)
                continue
            if machine is not None:
                machines[machine.id] = machine

    await asyncio.gather(*(recover_id(group) for group in by_id.values()))


def _files(ctx: MachineContext, record: VmRecord) -> VmFiles:
    """The VM's files by the settings' rules for its (validated) UUID; `record.files` is for
    humans only, so an edited record cannot point the clean-up at another file."""
    q = ctx.settings.qemu
    return VmFiles(
        directory=Path(q.TMP_FILE_LOC), paths=vm_paths(q, record.uuid, with_manifest=True)
    )


def started_as_recorded(record: VmRecord, cmdline: Sequence[str]) -> bool:
    """Whether a live command line is the one the daemon exec'd for a VM still starting.

    Its exact command line is recorded only once QEMU answers; before that the process may
    be the argv exec'd (sudo keeps it), an interpreter running it (a script: the argv is a
    suffix), or what a wrapper exec'd (env, `exec qemu "$@"`: its arguments are a suffix of
    the argv). Either way the common part must name the VM's UUID, which every QEMU command
    line of the daemon does, so an unrelated process never matches.
    """
    argv, live = list(record.argv), list(cmdline)
    if not argv or not live:
        return False
    if live[-len(argv) :] == argv and len(live) >= len(argv):
        common = argv
    elif len(live) > 1 and argv[-(len(live) - 1) :] == live[1:] and len(argv) >= len(live) - 1:
        common = live[1:]
    else:
        return False
    return any(record.uuid in part for part in common)


def _identity_doubt(record: VmRecord) -> str:
    """Why the recorded process must not be signalled, or "" when it may be."""
    if record.boot_id != current_boot_id():
        return (
            f"it was written in another boot ({record.boot_id or 'unknown'}): its pid "
            f"{record.pid} is not its QEMU any more; nothing signalled"
        )
    if not record.pid or record.state == VmState.RUNNING.value:
        return ""  # running: QemuProcess.adopt compares the exact command line
    identity = process_identity(record.pid)
    if identity is None or identity[0] != record.start_time:
        return ""  # gone, or another start time: adopt() refuses it, the usual way
    if not started_as_recorded(record, identity[1]):
        return (
            f"pid {record.pid} has its start time but not the command line the daemon "
            "exec'd: left alone"
        )
    return ""


def _kill_unrecorded(record: VmRecord) -> list[int]:
    """A daemon killed while QEMU was being spawned left a record with the command line but no
    pid: the QEMU (or the sudo or wrapper running it) is found by that command line, which
    names the VM's UUID, and killed, as any VM still starting is. The pidfd is opened first
    and the command line checked again with it held, so a recycled pid is never hit."""
    killed = []
    for pid, _, cmdline in live_processes():
        if not started_as_recorded(record, cmdline):
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            again = process_identity(pid)
            if again is not None and started_as_recorded(record, again[1]):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed.append(pid)
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return killed


async def _recover_one(ctx: MachineContext, record: VmRecord, *, taken: bool) -> Machine | None:
    log = _log.bind(computation_id=record.computation_id, pid=record.pid)
    spawning = not record.pid and record.argv and record.boot_id == current_boot_id()
    if spawning and (killed := _kill_unrecorded(record)):
        log.warning(
            "QEMU spawned as the daemon died, found by its command line: killed", pids=killed
        )
    # A VM kept paused for inspection (MANAGER_QEMU_ON_GUEST_HALT=keep) is kept across a
    # restart too: its Run had answered, as a running one's.
    paused = record.state == VmState.PAUSED.value
    running = record.state == VmState.RUNNING.value or paused
    process: QemuProcess | None = None
    files = _files(ctx, record)
    if doubt := _identity_doubt(record):
        files.remove()
        ctx.store.remove(record.uuid)
        log.warning(f"VM record cleaned up: {doubt}")
        return None
    if record.pid:
        # A starting record: the live command line was just checked against the argv; adopt()
        # re-checks it, and the start time, with the pidfd held.
        live = None if running else (process_identity(record.pid) or (0, None))[1]
        try:
            process = QemuProcess.adopt(
                record.pid, record.argv, record.start_time, record.cmdline if running else live
            )
        except ProcessLookupError:
            process = None
    reason = ""
    if process is None and record.pid and process_identity(record.pid) is not None:
        reason = (
            f"pid {record.pid} is alive but is not the recorded QEMU (start time or command "
            "line differ): left alone"
        )
    elif process is None:
        reason = "its QEMU is gone"
    elif not running:
        reason = f"it was {record.state} when the daemon stopped"
    elif taken:
        reason = "another VM holds its computation id"
    else:
        try:
            # MANAGER_QEMU_ADOPT_TIMEOUT: bounded, so one wedged QEMU cannot hold start-up past
            # systemd's TimeoutStartSec; the probes of all VMs run at once.
            timeout = ctx.settings.qemu.ADOPT_TIMEOUT
            await process.check_qmp(files.qmp_socket, timeout=timeout, paused=paused)
        except Exception as error:
            reason = f"its QMP monitor does not answer ({error!r})"
    if reason:
        if process is not None:
            process.kill_now()
            try:
                await process.terminate(0)
            except QemuStopFailedError as error:
                log.error("QEMU could not be stopped", error=str(error))
        if not taken:  # what it printed, up to its end, for Logs' post-mortem
            bound = ctx.settings.service.CONSOLE_FILE_BYTES
            keep_post_mortem(ctx.consoles, record.computation_id, files.console(bound))
        files.remove()
        ctx.store.remove(record.uuid)
        log.warning(f"VM record cleaned up: {reason}")
        return None
    assert process is not None
    machine = adopt_machine(ctx, record, process, files)
    await process.history_read(ctx.settings.qemu.ADOPT_TIMEOUT)
    log.info("VM re-adopted after restart", agent_port=record.host_port)
    return machine


def adopt_machine(
    ctx: MachineContext, record: VmRecord, process: QemuProcess, files: VmFiles
) -> Machine:
    """A VM an earlier run of the daemon started, proven to be the recorded one: its numbers
    held again as recorded, its start time and TTL deadline kept."""
    resources = VmResources(record.uuid, record.host_port, record.guest_cid, record.vnc_display)
    lease = ctx.pools.hold(record.computation_id, resources)
    machine = Machine(ctx, record.computation_id, lease, files=files, process=process, adopted=True)
    machine.started_at = started_at_from_ticks(record.start_time) or machine.started_at
    machine.expires_at = record.expires_at
    machine.readopted(paused=record.state == VmState.PAUSED.value)
    return machine
