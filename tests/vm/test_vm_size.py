"""A Run's own size and the pieces it is made of: QEMU memory sizes, the ceilings, the
derivation into -smp/-m (and nothing derived without a size), the SNP measurement's vCPU
count, and Go duration text for what Get prints back."""

from __future__ import annotations

import pytest

from cocos_manager.config.go_parse import go_duration_text, parse_go_duration
from cocos_manager.config.settings import QemuSettings
from cocos_manager.config.sizes import memory_mib
from cocos_manager.errors import InvalidArgumentError
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu.argv import VmResources, VmSize, derive_vm_settings, qemu_args
from cocos_manager.vm.attestation import measurement_inputs
from cocos_manager.vm.size import memory_ceiling, requested_size, vcpu_ceiling

VM = VmResources(uuid="u-1", host_port=6123, guest_cid=5, vnc_display=2)


@pytest.mark.parametrize(
    ("text", "mib"),
    [("2048M", 2048), ("30G", 30720), ("512", 512), ("1.5G", 1536), ("1T", 1 << 20),
     ("524288K", 512), ("2g", 2048), (" 4G ", 4096)],
)  # fmt: skip
def test_memory_sizes_read_as_qemus_m_reads_them(text: str, mib: int) -> None:
    assert memory_mib(text) == mib


@pytest.mark.parametrize("text", ["", "G", "4 G", "-1G", "4GB2", "0x10M", "lots"])
def test_what_qemu_would_not_read_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        memory_mib(text)


def test_no_size_derives_exactly_what_it_derived_before() -> None:
    """The argv goldens are those of derive_vm_settings without a size."""
    q = QemuSettings()
    assert qemu_args(derive_vm_settings(q, VM, VmSize())) == qemu_args(derive_vm_settings(q, VM))
    assert qemu_args(derive_vm_settings(q, VM, None)) == qemu_args(derive_vm_settings(q, VM))


def test_a_size_changes_smp_m_and_the_snp_memory_backend_together() -> None:
    q = QemuSettings(ENABLE_SEV_SNP=True)
    args = qemu_args(derive_vm_settings(q, VM, VmSize(vcpus=2, memory_mib=1024)))
    assert args[args.index("-smp") + 1] == "2,maxcpus=64"
    assert args[args.index("-m") + 1] == "1024M,slots=5,maxmem=30G"
    assert "memory-backend-memfd-private,id=ram1,size=1024M,share=true" in args


def test_the_snp_measurement_counts_the_vms_own_vcpus() -> None:
    q = QemuSettings(ENABLE_SEV_SNP=True)
    assert measurement_inputs(derive_vm_settings(q, VM)).vcpus == 4
    assert measurement_inputs(derive_vm_settings(q, VM, VmSize(vcpus=2))).vcpus == 2


def test_ceilings_default_to_the_default_size_and_stay_under_qemus_limits() -> None:
    assert vcpu_ceiling(QemuSettings())[0] == 4
    assert memory_ceiling(QemuSettings())[0] == 2048
    assert vcpu_ceiling(QemuSettings(MAX_SMP=16)) == (16, "MANAGER_QEMU_MAX_SMP")
    assert vcpu_ceiling(QemuSettings(MAX_SMP=100, SMP_MAXCPUS=8)) == (
        8,
        "MANAGER_QEMU_SMP_MAXCPUS",
    )
    assert memory_ceiling(QemuSettings(MAX_MEMORY_PER_VM="64G", MAX_MEMORY="32G")) == (
        32768,
        "MANAGER_QEMU_MAX_MEMORY",
    )


def test_a_request_within_the_ceilings_gets_its_size() -> None:
    q = QemuSettings(MAX_SMP=8, MAX_MEMORY_PER_VM="8G")
    request = pb.ComputationRunReq(vcpus=8, memory_mib=8192)
    assert requested_size(request, q) == VmSize(8, 8192)
    assert requested_size(pb.ComputationRunReq(), q) == VmSize()
    with pytest.raises(InvalidArgumentError, match="vcpus: 9 is over the ceiling of 8"):
        requested_size(pb.ComputationRunReq(vcpus=9), q)


@pytest.mark.parametrize("seconds", [20, 90, 3600, 5400.25, 0.5, 1.5, 0, 0.000001, 86400 * 3])
def test_go_duration_text_reads_back_as_the_same_duration(seconds: float) -> None:
    text = go_duration_text(seconds)
    assert parse_go_duration(text) == pytest.approx(seconds)
    assert go_duration_text(20) == "20s" and go_duration_text(90) == "1m30s"
