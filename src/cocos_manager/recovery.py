"""After a restart: re-adopt the VMs an earlier run of the daemon left running, clean the rest.

As libvirt does on reconnect, and stricter: a VM is kept only if its Run had answered, its
process is provably the recorded one (PID, start time and command line — a PID alone can be
reused) and its QMP monitor still answers. On any doubt the VM is killed and its files and
record removed rather than risk a VM nobody tracks. See docs/decisions.md, "Restarts".
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cocos_manager.errors import FailedPreconditionError, QemuStopFailedError
from cocos_manager.logging import get_logger
from cocos_manager.machine import Machine, MachineContext, VmState
from cocos_manager.qemu_process import QemuProcess
from cocos_manager.state_store import VmRecord, process_identity
from cocos_manager.vm_files import VmFiles

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
            machine = await _recover_one(ctx, record, taken=record.computation_id in machines)
            if machine is not None:
                machines[machine.id] = machine

    await asyncio.gather(*(recover_id(group) for group in by_id.values()))


async def _recover_one(ctx: MachineContext, record: VmRecord, *, taken: bool) -> Machine | None:
    log = _log.bind(computation_id=record.computation_id, pid=record.pid)
    running = record.state == VmState.RUNNING.value
    process: QemuProcess | None = None
    if record.pid:
        try:
            process = QemuProcess.adopt(
                record.pid, record.argv, record.start_time, record.cmdline if running else None
            )
        except ProcessLookupError:
            process = None
    files = VmFiles(
        directory=Path(ctx.settings.qemu.TMP_FILE_LOC),
        paths={name: Path(path) for name, path in record.files.items()},
    )
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
            await process.check_qmp(files.qmp_socket, timeout=timeout)
        except Exception as error:
            reason = f"its QMP monitor does not answer ({error!r})"
    if reason:
        if process is not None:
            process.kill_now()
            try:
                await process.terminate(0)
            except QemuStopFailedError as error:
                log.error("QEMU could not be stopped", error=str(error))
        files.remove()
        ctx.store.remove(record.uuid)
        log.warning(f"VM record cleaned up: {reason}")
        return None
    assert process is not None
    machine = Machine.adopt(ctx, record, process, files)
    log.info("VM re-adopted after restart", agent_port=record.host_port)
    return machine
