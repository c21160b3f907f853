"""What Get says about one VM (`cocos-manager-cli show`, as virsh dominfo): what List says,
and how it was launched: QEMU's command line, its files, the settings and size it got, its
confidential launch as QEMU got it, its TTL, why it is paused, and once it ended, how.

Read off the Machine; the wire format is docs/contracts.md, "Pause, Resume, Get, forced Stop".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cocos_manager.confidential import launched_binding, launched_mode
from cocos_manager.config import QemuSettings, go_duration_text, memory_mib
from cocos_manager.errors import NotFoundError
from cocos_manager.events import ConsoleArchive
from cocos_manager.host import VmRecord
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm.lifecycle import VmEnd, VmState
from cocos_manager.vm.listing import computation_info, started_at_from_ticks

if TYPE_CHECKING:
    from cocos_manager.vm.machine import Machine
    from cocos_manager.vm.output import PostMortem

ENDED = "ended"
"""Get's state of a VM that is no longer held (List does not show it)."""
RECOVERY = "recovery"
"""VmExit's reason for a VM the daemon's start found ended, or ended (vm/recovery.py)."""
DOWN = "ended while the manager was down"
"""VmExit's exit for a VM whose QEMU ended while no daemon ran: how, nobody saw."""


def listed_state(machine: Machine) -> str:
    """List's word for the state: admitted and starting VMs are both "starting"."""
    if machine.state in (None, VmState.ADMITTED, VmState.STARTING):
        return "starting"
    return ENDED if machine.state is VmState.RELEASED else machine.state.value


def machine_info(machine: Machine) -> pb.ComputationInfo:
    """What List says of it, and Get's `computation`: one place for both."""
    ended = machine.state is VmState.RELEASED
    r = machine.resources
    return computation_info(
        machine.id,
        state=listed_state(machine),
        host_port=r.host_port,
        guest_cid=0 if machine.fw_cfg else r.guest_cid,  # fw_cfg: no vsock device
        vnc_display=r.vnc_display,
        pid=None if ended or machine.process is None else machine.process.pid,
        started_at=machine.started_at,
        expires_at=None if ended else machine.expires_at,  # no deadline for what has ended
        adopted=machine.adopted,
    )


def _size(machine: Machine) -> tuple[int, int]:
    return _launched_size(
        machine.launch_settings,
        machine.size.vcpus,
        machine.size.memory_mib,
        machine.ctx.settings.qemu,
    )


def _launched_size(
    launched: dict[str, str], asked_vcpus: int, asked_mib: int, q: QemuSettings
) -> tuple[int, int]:
    """vCPUs and MiB as launched: the settings it got, else its request, else the settings."""
    vcpus = launched.get("MANAGER_QEMU_SMP_COUNT") or str(asked_vcpus or q.SMP_COUNT)
    memory = launched.get("MANAGER_QEMU_MEMORY_SIZE") or (
        f"{asked_mib}M" if asked_mib else q.MEMORY_SIZE
    )
    try:
        return int(vcpus), memory_mib(memory)
    except ValueError:
        return 0, 0


def _exit(end: VmEnd) -> pb.VmExit:
    details: dict[str, Any] = end.details
    last = details.get("last_lines")
    exit_info = pb.VmExit(
        reason=end.reason.value,
        event_type=end.event[0],
        status=end.event[1],
        exit=str(details.get("exit", "")),
        error=str(details.get("error", "")),
        stop_error=str(details.get("stop_error", "")),
        last_lines=[str(line) for line in last] if isinstance(last, list) else [],
    )
    exit_info.ended_at.FromNanoseconds(int(end.at * 1e9))
    return exit_info


def vm_info(machine: Machine) -> pb.GetResponse:
    process = machine.process
    argv = list(process.argv) if process is not None else list(machine.spawning_argv)
    vcpus, memory = _size(machine)
    paused_by = ""
    if machine.state is VmState.PAUSED:
        paused_by = "operator" if machine.operator_paused else _halt_status(machine)
    response = pb.GetResponse(
        computation=machine_info(machine),
        qemu_argv=argv,
        files={
            name: str(path) for name, path in (machine.files.paths.items() if machine.files else ())
        },
        settings=machine.launch_settings,
        confidential_mode=launched_mode(argv),
        binding=launched_binding(argv),
        ttl=go_duration_text(machine.ttl) if machine.ttl else "",
        vcpus=vcpus,
        memory_mib=memory,
        paused_by=paused_by,
    )
    if machine.ended is not None:
        response.last_exit.CopyFrom(_exit(machine.ended))
    return response


def record_info(
    record: VmRecord, q: QemuSettings, exit_text: str, post_mortem: PostMortem
) -> pb.GetResponse:
    """Get of a VM the daemon's start found ended (its QEMU gone: `exit_text` is DOWN) or
    ended itself (why, in recovery's words), told from its record and its console file as
    Get tells any ended VM. No final event was published of it: event_type and status are
    empty."""
    argv = record.argv or record.cmdline  # as exec'd, as Get says of a held VM
    fw_cfg = record.settings.get("MANAGER_QEMU_AGENT_CHANNEL", q.AGENT_CHANNEL.value) == "fw_cfg"
    vcpus, memory = _launched_size(record.settings, record.vcpus, record.memory_mib, q)
    response = pb.GetResponse(
        computation=computation_info(
            record.computation_id,
            state=ENDED,
            host_port=record.host_port,
            guest_cid=0 if fw_cfg else record.guest_cid,
            vnc_display=record.vnc_display,
            pid=None,
            started_at=started_at_from_ticks(record.start_time),
            expires_at=None,
            adopted=False,
        ),
        qemu_argv=argv,
        settings=record.settings,
        confidential_mode=launched_mode(argv),
        binding=launched_binding(argv),
        vcpus=vcpus,
        memory_mib=memory,
        last_exit=pb.VmExit(reason=RECOVERY, exit=exit_text, last_lines=post_mortem.last_lines),
    )
    response.last_exit.ended_at.FromNanoseconds(int(post_mortem.ended_at * 1e9))
    return response


def _halt_status(machine: Machine) -> str:
    halt = machine.halt or {}
    return str(halt.get("qemu_status", "halted"))


class EndedVms:
    """Get's answers for VMs that ended, kept as long as their console is (the same retention:
    MANAGER_LOG_RETENTION and MANAGER_LOG_RETAINED_VMS), so the two never disagree."""

    def __init__(self, consoles: ConsoleArchive) -> None:
        self._consoles = consoles
        self._ended: dict[str, pb.GetResponse] = {}

    def keep(self, machine: Machine) -> None:
        """Never in the way of the release it runs in."""
        try:
            info = vm_info(machine)
        except Exception as error:
            machine.log.error("cannot keep the ended VM for Get", error=repr(error))
            return
        info.ClearField("files")  # removed with the VM
        self._ended[machine.id] = info
        self._prune()

    def keep_found(self, info: pb.GetResponse) -> None:
        """A VM found ended at the daemon's start (record_info); its console is kept first."""
        self._ended[info.computation.computation_id] = info
        self._prune()

    def get(self, computation_id: str) -> pb.GetResponse:
        self._prune()
        ended = self._ended.get(computation_id)
        if ended is None:
            raise NotFoundError(
                f"computation {computation_id!r} is not running and no record of its end is kept"
            )
        return ended

    def _prune(self) -> None:
        kept = set(self._consoles.retained)
        for computation_id in [i for i in self._ended if i not in kept]:
            del self._ended[computation_id]
