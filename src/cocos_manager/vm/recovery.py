"""After a restart: re-adopt the VMs an earlier run of the daemon left running, clean the rest.

As libvirt does on reconnect, and stricter: a VM is kept only if its Run had answered, its
process is provably the recorded one (PID, start time and command line — a PID alone can be
reused) and its QMP monitor still answers. A QEMU proven ours that cannot be kept is killed
and its files and record removed rather than risk a VM nobody tracks; a live process that is
not proven ours is never signalled, and its record and files are kept and named in an error
line, so an operator can find it. See docs/decisions.md, "Restarts".

Nothing is signalled on a record's word alone: a record of another boot (its PID and start
time belong to a process table that no longer exists) is cleaned without signalling, and a
process is signalled only when its start time matches and its command line is the one the
daemon exec'd (for a "starting" record: the same QEMU arguments, a wrapper may have exec'd).
Paths come from the validated UUID and the settings, never from the record.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cocos_manager.config import GuestHaltAction
from cocos_manager.errors import FailedPreconditionError, QemuStopFailedError
from cocos_manager.host import VmRecord, current_boot_id, live_processes, process_identity
from cocos_manager.qemu import QemuProcess, QmpError, VmResources, VmSize
from cocos_manager.telemetry import get_logger
from cocos_manager.vm import orphans
from cocos_manager.vm.files import VmFiles, launch_dir_problem, launched_paths, shares_dir
from cocos_manager.vm.inspect import DOWN, EndedVms, record_info
from cocos_manager.vm.lifecycle import HALT_STATES, MachineContext, VmState
from cocos_manager.vm.listing import started_at_from_ticks
from cocos_manager.vm.machine import Machine
from cocos_manager.vm.output import PostMortem, keep_post_mortem

_log = get_logger()


async def recover(
    ctx: MachineContext, machines: dict[str, Machine], ended: EndedVms, *, sweep: bool
) -> None:
    """Adopted VMs are added to `machines`; everything else of the records is removed, and
    what ended of them (its QEMU gone, or ended here) is kept in `ended` for Get, as long as
    its console for Logs. With `sweep` (the daemon holds TMP_FILE_LOC alone), QEMUs and
    files there that no record names are ended and removed (orphans.py)."""
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
                machine = await _recover_one(
                    ctx, record, ended, taken=record.computation_id in machines
                )
            except Exception as error:  # never a traceback nor a restart loop over one record
                _log.error(
                    "VM record could not be recovered; dropped without signalling",
                    computation_id=record.computation_id,
                    pid=record.pid,
                    error=repr(error),
                )
                _files(ctx, record)[0].remove()
                ctx.store.remove(record.uuid)
                continue
            if machine is not None:
                # Registered before its console's history is read (an await): a VM that ends
                # meanwhile is released as any other, never registered once released.
                machines[machine.id] = machine
                if machine.process is not None:
                    await machine.process.output.history_read(ctx.settings.qemu.ADOPT_TIMEOUT)

    await asyncio.gather(*(recover_id(group) for group in by_id.values()))
    current = ctx.settings.qemu.TMP_FILE_LOC
    known = (
        ctx.store.uuids()
    )  # the records kept: a QEMU naming the files of one just cleaned is no VM's
    if sweep:
        await orphans.sweep_current(ctx.store.directory, Path(current), known)
    recorded = {r.tmp_dir for group in by_id.values() for r in group if r.uuid in known}
    await orphans.sweep_former(ctx.store.directory, current, recorded, known)


def _files(ctx: MachineContext, record: VmRecord) -> tuple[VmFiles, str]:
    """The VM's files where it was launched, and why they are not to be touched ("" when they
    may be). The directory is the recorded MANAGER_QEMU_TMP_FILE_LOC, so a VM survives a
    change of the setting; one other than the current setting is used only once checked
    (launch_dir_problem), and the names in it come from the settings' rules for the
    (validated) UUID, so an edited record cannot point the clean-up at another file. A
    record older than the field: the setting's directory, as before. The shares of a
    CreateVm'd VM are always among them (the record does not say which kind it was)."""
    q = ctx.settings.qemu
    where = record.tmp_dir or q.TMP_FILE_LOC
    if where != q.TMP_FILE_LOC and (problem := launch_dir_problem(where)):
        return VmFiles(directory=Path(where)), problem
    shares = Path(where) / shares_dir(q, record.uuid).name
    paths = launched_paths(q, record.uuid, where, record.files)
    return VmFiles(Path(where), paths, shares=shares), ""


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


def _proven(record: VmRecord, cmdline: Sequence[str]) -> bool:
    """Whether a live command line, of the process with the recorded PID and start time, is
    the recorded QEMU's: the exact one read once QEMU answered, or, where none was recorded
    (a VM still starting; a record an earlier version wrote after an adoption), the argv the
    daemon exec'd, as `started_as_recorded` matches it."""
    if record.cmdline:
        return list(cmdline) == record.cmdline
    return started_as_recorded(record, cmdline)


def _leave_running(ctx: MachineContext, record: VmRecord, cmdline: Sequence[str]) -> None:
    """A live process with the recorded PID and start time (so the very process the record
    names) whose command line is not the recorded one: not provably ours, so neither adopted
    nor signalled. Its record and files stay, so an operator can find it; once it has ended
    the next start cleans them. Its guest CID is not handed out again meanwhile (its port
    and display are refused by the probes while it holds them)."""
    ctx.pools.cids.shun(record.guest_cid)
    _log.error(
        "VM not re-adopted: a live process has the recorded PID and start time but not the "
        "recorded command line, so it is neither adopted nor signalled; its record and files "
        f"are kept. If it is the VM's QEMU, end it with `kill {record.pid}` (then `kill -9 "
        f"{record.pid}` if it lingers); the next start of the daemon then removes them",
        computation_id=record.computation_id,
        pid=record.pid,
        agent_port=record.host_port,
        vnc_display=record.vnc_display,
        guest_cid=record.guest_cid,
        command=" ".join(cmdline)[:500],
        record=str(ctx.store.directory / f"vm-{record.uuid}.*.json"),
    )


def _unrecorded(record: VmRecord) -> list[tuple[int, int, list[str]]]:
    """A daemon killed while QEMU was being spawned left a record with the command line but no
    pid: (pid, start time, command line) of the processes running that command line, which
    names the VM's UUID (QEMU, or the wrapper or sudo running it). Behind sudo, sudo alone:
    its QEMU is root's, out of reach of the daemon's signals, and is ended through it, as
    QemuProcess ends any VM behind sudo. Reads /proc: off the loop."""
    found = [
        (pid, start_time, cmdline)
        for pid, start_time, cmdline in live_processes()
        if started_as_recorded(record, cmdline)
    ]
    if any(os.path.basename(cmdline[0]) == "sudo" for _, _, cmdline in found):
        found = [entry for entry in found if os.path.basename(entry[2][0]) == "sudo"]
    return found


async def _end_unrecorded(record: VmRecord, log: Any) -> None:
    """Ends the QEMU of a record that names no pid, as a VM still starting is ended (kill_now,
    terminate): SIGKILL where the daemon may signal it; behind sudo, the SIGTERM sudo relays,
    then `sudo -n kill`. A SIGKILL to sudo as well, as before, ended sudo alone (it relays
    nothing) and root's QEMU ran on, untracked. Returns once each has ended, so its files are
    removed and its numbers reused only then (a SIGKILL takes effect when the process next
    runs, later on a loaded host); one that cannot be ended is named in an error line."""
    found = await asyncio.to_thread(_unrecorded, record)
    ended = []
    for pid, start_time, cmdline in found:
        try:
            # adopt() re-checks the start time and command line with the pidfd held: a pid
            # reused meanwhile is never signalled.
            process = QemuProcess.adopt(pid, cmdline, start_time, cmdline)
        except ProcessLookupError:
            continue
        process.kill_now()
        try:
            await process.terminate(0)
        except QemuStopFailedError as error:
            log.error("QEMU spawned as the daemon died could not be ended", error=str(error))
            continue
        ended.append(pid)
    if ended:
        log.warning("QEMU spawned as the daemon died, found by its command line: ended", pids=ended)


async def _recover_one(
    ctx: MachineContext, record: VmRecord, ended: EndedVms, *, taken: bool
) -> Machine | None:
    log = _log.bind(computation_id=record.computation_id, pid=record.pid)
    if not record.pid and record.argv and record.boot_id == current_boot_id():
        await _end_unrecorded(record, log)
    # A VM kept paused for inspection (MANAGER_QEMU_ON_GUEST_HALT=keep) is kept across a
    # restart too: its Run had answered, as a running one's.
    paused = record.state == VmState.PAUSED.value
    running = record.state == VmState.RUNNING.value or paused
    process: QemuProcess | None = None
    files, files_problem = _files(ctx, record)
    if files_problem:
        log.error(
            "VM files not touched: the directory it was launched in (MANAGER_QEMU_TMP_FILE_LOC "
            f"then) is not one the daemon may use: {files_problem}. They stay there; its QEMU, "
            "if it is alive and ours, is kept running without its QMP monitor (Stop ends it by "
            "signal)",
            launch_dir=record.tmp_dir,
            agent_port=record.host_port,
            vnc_display=record.vnc_display,
        )
    if record.boot_id != current_boot_id():
        files.remove()
        ctx.store.remove(record.uuid)
        log.warning(
            f"VM record cleaned up: it was written in another boot ({record.boot_id or 'unknown'}"
            f"): its pid {record.pid} is not its QEMU any more; nothing signalled"
        )
        return None
    identity = process_identity(record.pid) if record.pid else None
    if identity is not None and identity[0] == record.start_time:
        if not _proven(record, identity[1]):
            _leave_running(ctx, record, identity[1])
            return None
        try:
            # adopt() re-checks the start time and this command line with the pidfd held.
            process = QemuProcess.adopt(record.pid, record.argv, record.start_time, identity[1])
        except ProcessLookupError:
            process = None
    reason, status = "", ""  # status: QEMU's run state, where a running record is asked
    gone = process is None
    if process is None and identity is not None:
        reason = f"its QEMU is gone (pid {record.pid} is now another process's: left alone)"
    elif process is None:
        reason = "its QEMU is gone"
    elif not running:
        reason = f"it was {record.state} when the daemon stopped"
    elif taken:
        reason = "another VM holds its computation id"
    elif not files_problem:  # a socket in a directory not proven ours is not asked
        try:
            # MANAGER_QEMU_ADOPT_TIMEOUT: bounded, so one wedged QEMU cannot hold start-up past
            # systemd's TimeoutStartSec; the probes of all VMs run at once.
            timeout = ctx.settings.qemu.ADOPT_TIMEOUT
            # Any status answers: a running record whose QEMU says "paused" is a Pause whose
            # QMP stop landed but whose record the daemon died before writing.
            await process.check_qmp(files.qmp_socket, timeout=timeout, paused=True)
            keep = ctx.settings.qemu.ON_GUEST_HALT is GuestHaltAction.KEEP
            status = "" if paused else await _status_unrecorded(process, timeout, keep)
            if status == "paused":
                log.warning("VM found paused by a Pause its record missed: kept paused")
                record.state, record.operator_paused = VmState.PAUSED.value, True
            elif status in HALT_STATES:  # a halt its record missed (full state dir, no daemon)
                log.warning("VM found halted, its record said running: kept", qemu_status=status)
                record.state, record.operator_paused = VmState.PAUSED.value, False
            elif record.operator_paused and await _resumed_unrecorded(process, timeout):
                log.warning("VM found running after a Resume its record missed: running")
                record.state, record.operator_paused = VmState.RUNNING.value, False
        except Exception as error:
            reason = f"its QMP monitor does not answer ({error!r})"
    if reason:
        if process is not None:
            process.kill_now()
            try:
                await process.terminate(0)
            except QemuStopFailedError as error:
                log.error("QEMU could not be stopped", error=str(error))
        if not taken and not files_problem:  # what it printed, for Logs' post-mortem
            bound = ctx.settings.service.CONSOLE_FILE_BYTES
            found = keep_post_mortem(ctx.consoles, record.computation_id, files.console(bound))
            _keep_ended(ctx, record, ended, found, gone=gone, reason=reason)
        files.remove()
        ctx.store.remove(record.uuid)
        log.warning(f"VM record cleaned up: {reason}")
        return None
    assert process is not None
    halted = status if status in HALT_STATES else ""
    machine = adopt_machine(ctx, record, process, files, halted)
    moved = str(files.directory) != ctx.settings.qemu.TMP_FILE_LOC
    log.info(
        "VM re-adopted after restart",
        agent_port=record.host_port,
        **({"launch_dir": str(files.directory)} if moved else {}),
    )
    return machine


def _keep_ended(
    ctx: MachineContext,
    record: VmRecord,
    ended: EndedVms,
    found: PostMortem,
    *,
    gone: bool,
    reason: str,
) -> None:
    """Get shows it ended, as any VM that ended while this daemon ran (Logs has its console):
    its QEMU gone while no daemon ran, when its console file says; or ended here, now, and
    why. Never in the way of the clean-up it runs in."""
    if not gone:
        found = PostMortem(time.time(), found.last_lines)
    exit_text = DOWN if gone else f"ended at the manager's start: {reason}"
    try:
        ended.keep_found(record_info(record, ctx.settings.qemu, exit_text, found))
    except Exception as error:
        _log.error(
            "cannot keep the ended VM for Get",
            computation_id=record.computation_id,
            error=repr(error),
        )


async def _status_unrecorded(process: QemuProcess, timeout: float, keep_halted: bool) -> str:
    """For a running record, QEMU's run state: "paused" (only a QMP `stop`, i.e. a Pause, puts
    it there), a halt (HALT_STATES) when MANAGER_QEMU_ON_GUEST_HALT=keep keeps halted guests,
    or "running"; QmpError for any other."""
    assert process.monitor is not None
    async with asyncio.timeout(timeout):
        status = await process.monitor.query_status()
    if status in ("running", "paused") or (keep_halted and status in HALT_STATES):
        return str(status)
    monitor, process.monitor = process.monitor, None  # not kept: as check_qmp refusing
    await monitor.close()
    raise QmpError(f"QEMU reports VM status {status!r} instead of 'running'")


async def _resumed_unrecorded(process: QemuProcess, timeout: float) -> bool:
    """For a record paused by Pause: True if QEMU runs (a Resume's `cont` landed, its record
    did not)."""
    assert process.monitor is not None
    async with asyncio.timeout(timeout):
        return await process.monitor.query_status() == "running"


def adopt_machine(
    ctx: MachineContext, record: VmRecord, process: QemuProcess, files: VmFiles, halted: str = ""
) -> Machine:
    """A VM an earlier run of the daemon started, proven to be the recorded one: its numbers
    held again as recorded, its start time and TTL deadline kept. `halted`: the halt state
    QEMU reported for a record that said running (kept paused as halted)."""
    resources = VmResources(record.uuid, record.host_port, record.guest_cid, record.vnc_display)
    lease = ctx.pools.hold(record.computation_id, resources)
    machine = Machine(ctx, record.computation_id, lease, files=files, process=process, adopted=True)
    machine.started_at = started_at_from_ticks(record.start_time) or machine.started_at
    machine.expires_at = record.expires_at
    machine.launch = record.launch
    machine.size = VmSize(record.vcpus, record.memory_mib)
    machine.launch_settings = dict(record.settings)
    machine.readopted(
        paused=record.state == VmState.PAUSED.value,
        by_operator=record.operator_paused,
        halted=halted,
    )
    return machine
