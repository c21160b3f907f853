"""CVMInfo: what a verifier checks a VM's attestation against besides its report, read from
the command line its QEMU was actually given.

Upstream answered the daemon's settings whatever the id (and no kernel command line): here
CPUs, CPU model and kernel command line are those of *that* VM's QEMU, so a VM started before
the settings changed (or re-adopted after a restart) is described as it runs. The OVMF and
EOS versions are the operator's word (MANAGER_QEMU_OVMF_VERSION, MANAGER_EOS_VERSION): nothing
in the VM says them.
"""

from __future__ import annotations

from collections.abc import Sequence

from cocos_manager.config import Settings
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu import option_values

INT32_MAX = 2**31 - 1


def _cpu_count(smp: str) -> int:
    """The vCPUs of `-smp N,maxcpus=M` (or `cpus=N,...`); 0 when it does not say."""
    for part in smp.split(","):
        key, _, value = part.partition("=")
        text = value if value else key
        if (not value or key == "cpus") and text.isdigit():
            return min(int(text), INT32_MAX)
    return 0


def cvm_info(vm_id: str, argv: Sequence[str], settings: Settings) -> pb.CVMInfoRes:
    smp = option_values(argv, "-smp")
    cpu = option_values(argv, "-cpu")
    append = option_values(argv, "-append")
    return pb.CVMInfoRes(
        id=vm_id,
        ovmf_version=settings.qemu.OVMF_VERSION,
        cpu_num=_cpu_count(smp[-1]) if smp else 0,
        cpu_type=cpu[-1] if cpu else "",
        kernel_cmd=append[-1] if append else "",
        eos_version=settings.service.EOS_VERSION,
    )
