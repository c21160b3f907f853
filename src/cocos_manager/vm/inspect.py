"""What Get says about one VM (`cocos-manager-cli show`, as virsh dominfo): what List says,
and how it was launched: QEMU's command line, its files, the settings and size it got, its
confidential launch as QEMU got it, its TTL, why it is paused, and once it ended, how.

Read off the Machine; the wire format is docs/contracts.md, "Pause, Resume, Get, forced Stop".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cocos_manager.confidential.modes import launched_binding, launched_mode
from cocos_manager.config.go_parse import go_duration_text
from cocos_manager.config.sizes import memory_mib
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm.lifecycle import VmEnd, VmState
from cocos_manager.vm.listing import computation_info

if TYPE_CHECKING:
    from cocos_manager.vm.machine import Machine

ENDED = "ended"
"""Get's state of a VM that is no longer held (List does not show it)."""


def listed_state(machine: Machine) -> str:
    """List's word for the state: admitted and starting VMs are both "starting"."""
    if machine.state in (None, VmState.ADMITTED, VmState.STARTING):
        return "starting"
    return ENDED if machine.state is VmState.RELEASED else machine.state.value


def machine_info(machine: Machine) -> pb.ComputationInfo:
    ended = machine.state is VmState.RELEASED
    r = machine.resources
    return computation_info(
        machine.id,
        state=listed_state(machine),
        host_port=r.host_port,
        guest_cid=r.guest_cid,
        vnc_display=r.vnc_display,
        pid=None if ended or machine.process is None else machine.process.pid,
        started_at=machine.started_at,
        expires_at=None if ended else machine.expires_at,  # no deadline for what has ended
        adopted=machine.adopted,
    )


def _size(machine: Machine) -> tuple[int, int]:
    """vCPUs and MiB as launched: the settings it got, else its request, else the settings."""
    launched = machine.launch_settings
    q = machine.ctx.settings.qemu
    vcpus = launched.get("MANAGER_QEMU_SMP_COUNT") or str(machine.size.vcpus or q.SMP_COUNT)
    memory = launched.get("MANAGER_QEMU_MEMORY_SIZE") or (
        f"{machine.size.memory_mib}M" if machine.size.memory_mib else q.MEMORY_SIZE
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


def _halt_status(machine: Machine) -> str:
    halt = machine.halt or {}
    return str(halt.get("qemu_status", "halted"))
