"""A Run's own size (ComputationRunReq.vcpus / memory_mib) checked against the operator's
ceilings before anything is reserved: over a ceiling is the client's mistake, named with the
setting that refused it. Without a size the settings decide, exactly as before (docs/decisions.md,
"Per-Run size")."""

from __future__ import annotations

from cocos_manager.config import QemuSettings, memory_mib
from cocos_manager.errors import InvalidArgumentError
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu import VmSize


def vcpu_ceiling(q: QemuSettings) -> tuple[int, str]:
    """The most vCPUs a Run may ask for, and the setting that says so: MAX_SMP (its default:
    SMP_COUNT), never above SMP_MAXCPUS, which QEMU itself would refuse."""
    own = (q.MAX_SMP, "MANAGER_QEMU_MAX_SMP") if q.MAX_SMP else (q.SMP_COUNT, _default("SMP"))
    return min(own, (q.SMP_MAXCPUS, "MANAGER_QEMU_SMP_MAXCPUS"), key=lambda c: c[0])


def memory_ceiling(q: QemuSettings) -> tuple[int, str]:
    """The most MiB a Run may ask for: MAX_MEMORY_PER_VM (its default: MEMORY_SIZE), never
    above MAX_MEMORY (QEMU's maxmem). A setting QEMU would read but this cannot: 0."""
    if q.MAX_MEMORY_PER_VM:
        own = (q.MAX_MEMORY_PER_VM, "MANAGER_QEMU_MAX_MEMORY_PER_VM")
    else:
        own = (_mib(q.MEMORY_SIZE), _default("MEMORY"))
    return min(own, (_mib(q.MAX_MEMORY), "MANAGER_QEMU_MAX_MEMORY"), key=lambda c: c[0])


def _default(kind: str) -> str:
    if kind == "SMP":
        return "MANAGER_QEMU_MAX_SMP (unset: MANAGER_QEMU_SMP_COUNT)"
    return "MANAGER_QEMU_MAX_MEMORY_PER_VM (unset: MANAGER_QEMU_MEMORY_SIZE)"


def _mib(text: str) -> int:
    try:
        return memory_mib(text)
    except ValueError:
        return 0


def requested_size(request: pb.ComputationRunReq, q: QemuSettings) -> VmSize:
    """The size this Run gets; InvalidArgumentError naming the ceiling it is over."""
    if request.vcpus:
        ceiling, name = vcpu_ceiling(q)
        if request.vcpus > ceiling:
            raise InvalidArgumentError(
                f"vcpus: {request.vcpus} is over the ceiling of {ceiling} set by {name}"
            )
    if request.memory_mib:
        ceiling, name = memory_ceiling(q)
        if request.memory_mib > ceiling:
            raise InvalidArgumentError(
                f"memory_mib: {request.memory_mib} is over the ceiling of {ceiling} MiB set by "
                f"{name}"
            )
    return VmSize(vcpus=request.vcpus, memory_mib=request.memory_mib)
