"""A Machine as its VM record on disk: what is written at every state change, and the error a
record that cannot be written turns into.

Apart from vm/machine.py because it is the record's shape, not the lifecycle: vm/recovery.py reads
back exactly these fields after a restart.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Protocol

from cocos_manager.errors import FailedPreconditionError, ResourceExhaustedError
from cocos_manager.host import VmRecord
from cocos_manager.qemu import QemuProcess, VmResources, VmSize
from cocos_manager.vm.files import VmFiles, vm_paths
from cocos_manager.vm.lifecycle import MachineContext, VmState


class RecordedVm(Protocol):
    """What a record says of its Machine (vm/machine.py imports this module, never the other
    way)."""

    id: str
    ctx: MachineContext
    state: VmState | None
    files: VmFiles | None
    process: QemuProcess | None
    expires_at: float | None
    spawning_argv: list[str]
    launch: dict[str, Any] | None
    operator_paused: bool
    size: VmSize
    launch_settings: dict[str, str]

    @property
    def uuid(self) -> str: ...
    @property
    def resources(self) -> VmResources: ...


def record_of(machine: RecordedVm) -> VmRecord:
    """What a restart needs to find the VM again and prove its QEMU is the one recorded."""
    r = machine.resources
    q = machine.ctx.settings.qemu
    files = (
        machine.files.paths
        if machine.files is not None
        else vm_paths(q, machine.uuid, with_manifest=True)
    )
    record = VmRecord(
        computation_id=machine.id,
        uuid=machine.uuid,
        state=machine.state.value if machine.state else VmState.ADMITTED.value,
        host_port=r.host_port,
        guest_cid=r.guest_cid,
        vnc_display=r.vnc_display,
        files={name: str(path) for name, path in files.items()},
        tmp_dir=str(machine.files.directory if machine.files is not None else q.TMP_FILE_LOC),
        expires_at=machine.expires_at,
        launch=machine.launch,
        operator_paused=machine.operator_paused,
        vcpus=machine.size.vcpus,
        memory_mib=machine.size.memory_mib,
        settings=dict(machine.launch_settings),
    )
    if machine.process is not None:
        record.pid, record.start_time = machine.process.pid, machine.process.start_time
        record.argv, record.cmdline = machine.process.argv, machine.process.cmdline
    elif machine.spawning_argv:  # being spawned: no pid yet, but the command line it gets
        record.argv = list(machine.spawning_argv)
    return record


def required(old: VmState | None, new: VmState) -> bool:
    """Whether a change of state fails when its record cannot be written (a full disk): the
    admission, a QEMU about to be named (STARTING), and RUNNING after STARTING. Without the
    first two a restart could not find the VM; without the third it would find a record
    saying `starting`, take the VM for one whose Run never answered, and end it. Any other
    change keeps the VM and logs the error: the version on the disk still names it (a
    restart's adoption too, which read it)."""
    if new in (VmState.ADMITTED, VmState.STARTING):
        return True
    return new is VmState.RUNNING and old is VmState.STARTING


def record_error(
    directory: Path, error: OSError
) -> ResourceExhaustedError | FailedPreconditionError:
    """A record that cannot be written, as the error the Run answers: a full disk is
    RESOURCE_EXHAUSTED, anything else names MANAGER_STATE_DIR and the reason."""
    directory_text = str(directory)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(
            f"MANAGER_STATE_DIR: no space left for the VM record in {directory_text!r}"
        )
    return FailedPreconditionError(
        f"MANAGER_STATE_DIR: cannot write the VM record in {directory_text!r}: {error.strerror}"
    )
