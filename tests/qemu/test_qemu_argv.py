"""The original's command line, option by option: the base command line and the per-VM derivation."""

from __future__ import annotations

import pytest

from cocos_manager.config.settings import QemuSettings
from cocos_manager.qemu.argv import (
    VmResources,
    derive_vm_settings,
    qemu_args,
    resolve_executable,
    vm_file_paths,
)

DEFAULT_ARGS = [
    "-enable-kvm",
    "-machine", "q35",
    "-cpu", "EPYC",
    "-smp", "4,maxcpus=64",
    "-m", "2048M,slots=5,maxmem=30G",
    "-drive", "if=pflash,format=raw,unit=0,file=/usr/share/OVMF/OVMF_CODE.fd,readonly=on",
    "-drive", "if=pflash,format=raw,unit=1,file=/usr/share/OVMF/OVMF_VARS.fd",
    "-netdev", "user,id=vmnic,hostfwd=tcp::7020-:7002",
    "-device", "virtio-net-pci,disable-legacy=on,iommu_platform=true,netdev=vmnic,addr=0x2,romfile=",
    "-device", "vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=3",
    "-vnc", ":0",
    "-object", "memory-backend-memfd-private,id=ram1,size=2048M,share=true",
    "-machine", "memory-backend=ram1,kvm-type=protected",
    "-kernel", "img/bzImage",
    "-append", '"earlyprintk=serial console=ttyS0"',
    "-initrd", "img/rootfs.cpio.gz",
    "-object", "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1",
    "-machine", "memory-encryption=sev0",
    "-nographic",
    "-monitor", "pty",
]  # fmt: skip


def settings(**env: object) -> QemuSettings:
    return QemuSettings(**env)  # type: ignore[arg-type]


def pairs(args: list[str]) -> list[tuple[str, str | None]]:
    """Options with their values, so a test can look one up without caring about position."""
    out: list[tuple[str, str | None]] = []
    for i, arg in enumerate(args):
        if arg.startswith("-") and not arg.startswith("-:"):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
            out.append((arg, value))
    return out


def test_defaults_are_the_original_command_line() -> None:
    assert qemu_args(settings()) == DEFAULT_ARGS


def test_append_is_one_element_with_its_quotes() -> None:
    args = qemu_args(settings())
    value = args[args.index("-append") + 1]
    assert value == '"earlyprintk=serial console=ttyS0"'
    assert value[0] == value[-1] == '"'


def test_plain_sev() -> None:
    args = qemu_args(settings(ENABLE_SEV=True, ENABLE_SEV_SNP=False))
    assert "memory-backend-memfd-private,id=ram1,size=2048M,share=true" not in args
    tail = args[args.index("-initrd") + 2 :]
    assert tail == [
        "-object", "sev-guest,id=sev0,cbitpos=51,reduced-phys-bits=1",
        "-machine", "memory-encryption=sev0",
        "-nographic", "-monitor", "pty",
    ]  # fmt: skip


def test_no_sev_at_all() -> None:
    args = qemu_args(settings(ENABLE_SEV=False, ENABLE_SEV_SNP=False))
    assert not any("sev" in a for a in args)
    assert not any("memory-backend" in a for a in args)
    assert args[args.index("-initrd") + 2 :] == ["-nographic", "-monitor", "pty"]


def test_sev_and_snp_together_use_snp() -> None:
    args = qemu_args(settings(ENABLE_SEV=True, ENABLE_SEV_SNP=True))
    assert "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1" in args
    assert not any(a.startswith("sev-guest") for a in args)


@pytest.mark.parametrize(
    ("sev", "snp", "kind"), [(True, False, "sev-guest"), (False, True, "sev-snp-guest")]
)
def test_kernel_hashes(sev: bool, snp: bool, kind: str) -> None:
    args = qemu_args(settings(ENABLE_SEV=sev, ENABLE_SEV_SNP=snp, KERNEL_HASH=True))
    assert f"{kind},id=sev0,cbitpos=51,reduced-phys-bits=1,discard=none,kernel-hashes=on" in args
    drives = [args[i + 1] for i, a in enumerate(args) if a == "-drive"]
    assert drives == ["if=pflash,format=raw,unit=0,file=/usr/share/OVMF/OVMF_CODE.fd,readonly=on"]


def test_kernel_hash_without_sev_only_drops_the_vars_drive() -> None:
    args = qemu_args(settings(ENABLE_SEV_SNP=False, KERNEL_HASH=True))
    assert args.count("-drive") == 1
    assert not any("kernel-hashes" in a for a in args)


@pytest.mark.parametrize(
    ("env", "option", "value"),
    [
        ({"MACHINE": "pc"}, "-machine", "pc"),
        ({"CPU": "EPYC-v4"}, "-cpu", "EPYC-v4"),
        ({"SMP_COUNT": 2, "SMP_MAXCPUS": 8}, "-smp", "2,maxcpus=8"),
        ({"MEMORY_SIZE": "512M", "MEMORY_SLOTS": 2, "MAX_MEMORY": "4G"}, "-m", "512M,slots=2,maxmem=4G"),
        ({"OVMF_CODE_IF": "ide", "OVMF_CODE_FORMAT": "qcow2", "OVMF_CODE_UNIT": 3,
          "OVMF_CODE_FILE": "/c.fd", "OVMF_CODE_READONLY": "off"},
         "-drive", "if=ide,format=qcow2,unit=3,file=/c.fd,readonly=off"),
        ({"NETDEV_ID": "n0", "HOST_FWD_AGENT": 6100, "GUEST_FWD_AGENT": 7777},
         "-netdev", "user,id=n0,hostfwd=tcp::6100-:7777"),
        ({"VIRTIO_NET_PCI_DISABLE_LEGACY": "off", "VIRTIO_NET_PCI_IOMMU_PLATFORM": False,
          "NETDEV_ID": "n1", "VIRTIO_NET_PCI_ADDR": "0x5", "VIRTIO_NET_PCI_ROMFILE": "efi.rom"},
         "-device", "virtio-net-pci,disable-legacy=off,iommu_platform=false,netdev=n1,addr=0x5,romfile=efi.rom"),
        ({"VSOCK_ID": "vs", "VSOCK_GUEST_CID": 9}, "-device", "vhost-vsock-pci,id=vs,guest-cid=9"),
        ({"VSOCK_VNC": 7}, "-vnc", ":7"),
        ({"MEM_ID": "m9", "MEMORY_SIZE": "1G"}, "-object", "memory-backend-memfd-private,id=m9,size=1G,share=true"),
        ({"DISK_IMG_KERNEL_FILE": "/k"}, "-kernel", "/k"),
        ({"DISK_IMG_ROOTFS_FILE": "/r.gz"}, "-initrd", "/r.gz"),
        ({"KERNEL_CMDLINE": "console=ttyS0 quiet"}, "-append", "console=ttyS0 quiet"),
        ({"SEV_ID": "s1", "SEV_CBITPOS": 47, "SEV_REDUCED_PHYS_BITS": 5},
         "-object", "sev-snp-guest,id=s1,cbitpos=47,reduced-phys-bits=5"),
        ({"SEV_ID": "s1"}, "-machine", "memory-encryption=s1"),
        ({"MONITOR": "none"}, "-monitor", "none"),
    ],
)  # fmt: skip
def test_each_option(env: dict[str, object], option: str, value: str) -> None:
    assert (option, value) in pairs(qemu_args(settings(**env)))


def test_vars_drive() -> None:
    args = qemu_args(settings(OVMF_VARS_IF="ide", OVMF_VARS_FORMAT="qcow2", OVMF_VARS_UNIT=4,
                              OVMF_VARS_FILE="/v.fd"))  # fmt: skip
    assert ("-drive", "if=ide,format=qcow2,unit=4,file=/v.fd") in pairs(args)


@pytest.mark.parametrize(("kvm", "present"), [(True, True), (False, False)])
def test_enable_kvm(kvm: bool, present: bool) -> None:
    assert ("-enable-kvm" in qemu_args(settings(ENABLE_KVM=kvm))) is present


def test_empty_machine_and_cpu_are_left_out() -> None:
    args = qemu_args(settings(MACHINE="", CPU="", ENABLE_SEV_SNP=False))
    assert "-cpu" not in args and "-machine" not in args


@pytest.mark.parametrize(("flag", "present"), [(True, True), (False, False)])
def test_no_graphic(flag: bool, present: bool) -> None:
    args = qemu_args(settings(NO_GRAPHIC=flag))
    assert ("-nographic" in args) is present
    assert args[-2:] == ["-monitor", "pty"]


def test_vsock_device_can_be_left_out_for_fw_cfg() -> None:
    args = qemu_args(settings(), vsock_device=False)
    assert not any("vhost-vsock" in a for a in args)
    without = list(DEFAULT_ARGS)
    i = without.index("vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=3")
    del without[i - 1 : i + 1]
    assert args == without


def test_executable_is_resolved_on_path() -> None:
    exe = resolve_executable(settings(BIN_PATH="qemu"), which=lambda name: f"/opt/bin/{name}")
    assert (exe.exe, exe.prefix) == ("/opt/bin/qemu", ())
    assert exe.command(["-a"]) == ["/opt/bin/qemu", "-a"]


def test_sudo_puts_qemu_first() -> None:
    exe = resolve_executable(settings(USE_SUDO=True), which=lambda name: f"/usr/bin/{name}")
    assert exe.command(["-a"]) == ["sudo", "/usr/bin/qemu-system-x86_64", "-a"]


def test_per_vm_derivation() -> None:
    base = settings(TMP_FILE_LOC="/var/tmp/cm")
    vm = derive_vm_settings(
        base, VmResources(uuid="u-1", host_port=6123, guest_cid=5, vnc_display=2)
    )
    args = qemu_args(vm)
    assert ("-netdev", "user,id=vmnic-u-1,hostfwd=tcp::6123-:7002") in pairs(args)
    assert any(a.startswith("virtio-net-pci,") and "netdev=vmnic-u-1," in a for a in args)
    assert ("-device", "vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=5") in pairs(args)
    assert ("-vnc", ":2") in pairs(args)
    assert ("-drive", "if=pflash,format=raw,unit=1,file=/var/tmp/cm/OVMF_VARS-u-1.fd") in pairs(
        args
    )
    assert ("-kernel", "/var/tmp/cm/bzImage-u-1") in pairs(args)
    assert ("-initrd", "/var/tmp/cm/rootfs.cpio-u-1.gz") in pairs(args)
    assert ("-object", "sev-snp-guest,id=sev0-u-1,cbitpos=51,reduced-phys-bits=1") in pairs(args)
    assert ("-machine", "memory-encryption=sev0-u-1") in pairs(args)
    assert base.NETDEV_ID == "vmnic"  # the base is left as it was


def test_per_vm_files_without_vars_copy_under_kernel_hash() -> None:
    paths = vm_file_paths(settings(KERNEL_HASH=True), "u")
    assert set(paths) == {"kernel", "rootfs"}
    assert str(paths["kernel"]) == "tmp/bzImage-u"
    assert str(paths["rootfs"]) == "tmp/rootfs.cpio-u.gz"
