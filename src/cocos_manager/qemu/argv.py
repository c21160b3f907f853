"""The QEMU command line, built by pure functions from settings.

The base command line must equal the original's element for element: SEV launch
measurements and operators' scripts depend on it. Per-VM values are applied by deriving
a settings copy (as the original mutated a copy of its config) and running the same
builder, so base and per-VM command lines can never drift apart.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cocos_manager.confidential import confidential_args, escape_option, pflash_drives, uses_bios
from cocos_manager.config import QemuSettings

FW_CFG_MANIFEST_NAME = "opt/cocos/agent-config.json"


class QemuNotFoundError(Exception):
    """BIN_PATH is not an executable on PATH: the daemon refuses to start."""


def _on_off(value: bool) -> str:
    return "true" if value else "false"


def _vnc_host(address: str) -> str:
    """-vnc takes an IPv6 address in brackets; "" keeps the original's every-interface ":N"."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def qemu_args(
    q: QemuSettings, *, vsock_device: bool = True, manifest: bytes | None = None
) -> list[str]:
    """The original's argument list (without the executable), in the original's order.

    A confidential launch in upstream syntax (SEV-SNP on QEMU 9.1+, TDX) puts its pieces
    where the seed had its own (firmware, memory backend, guest object); `manifest` is the
    VM's manifest, bound into attestation with MANAGER_QEMU_BIND_MANIFEST.
    """
    cc = confidential_args(q, manifest)
    args: list[str] = []
    if q.ENABLE_KVM:
        args.append("-enable-kvm")
    if q.MACHINE:
        args += ["-machine", q.MACHINE]
    if q.CPU:
        args += ["-cpu", q.CPU]
    args += ["-smp", f"{q.SMP_COUNT},maxcpus={q.SMP_MAXCPUS}"]
    args += ["-m", f"{q.MEMORY_SIZE},slots={q.MEMORY_SLOTS},maxmem={q.MAX_MEMORY}"]
    args += cc.firmware if cc is not None else pflash_drives(q)
    args += [
        "-netdev",
        f"user,id={q.NETDEV_ID},hostfwd=tcp:{q.HOST_FWD_ADDR}:{q.HOST_FWD_AGENT}-:{q.GUEST_FWD_AGENT}",
    ]
    args += [
        "-device",
        f"virtio-net-pci,disable-legacy={q.VIRTIO_NET_PCI_DISABLE_LEGACY},"
        f"iommu_platform={_on_off(q.VIRTIO_NET_PCI_IOMMU_PLATFORM)},netdev={q.NETDEV_ID},"
        f"addr={q.VIRTIO_NET_PCI_ADDR},romfile={escape_option(q.VIRTIO_NET_PCI_ROMFILE)}",
    ]
    if vsock_device:
        args += ["-device", f"vhost-vsock-pci,id={q.VSOCK_ID},guest-cid={q.VSOCK_GUEST_CID}"]
    args += ["-vnc", f"{_vnc_host(q.VNC_ADDR)}:{q.VSOCK_VNC}"]
    if cc is not None:
        args += cc.memory
    elif q.ENABLE_SEV_SNP:
        args += [
            "-object",
            f"memory-backend-memfd-private,id={q.MEM_ID},size={q.MEMORY_SIZE},share=true",
        ]
        args += ["-machine", f"memory-backend={q.MEM_ID},kvm-type=protected"]
    args += ["-kernel", q.DISK_IMG_KERNEL_FILE]
    args += ["-append", q.KERNEL_CMDLINE]
    args += ["-initrd", q.DISK_IMG_ROOTFS_FILE]
    if cc is not None:
        args += cc.guest
    elif q.ENABLE_SEV or q.ENABLE_SEV_SNP:
        kind = "sev-snp-guest" if q.ENABLE_SEV_SNP else "sev-guest"
        hashes = ",discard=none,kernel-hashes=on" if q.KERNEL_HASH else ""
        args += [
            "-object",
            f"{kind},id={q.SEV_ID},cbitpos={q.SEV_CBITPOS},"
            f"reduced-phys-bits={q.SEV_REDUCED_PHYS_BITS}{hashes}",
        ]
        args += ["-machine", f"memory-encryption={q.SEV_ID}"]
    if q.NO_GRAPHIC:
        args.append("-nographic")
    args += ["-monitor", q.MONITOR]
    return args


def effective_base_args(q: QemuSettings) -> list[str]:
    """The base line as a VM gets it: on the fw_cfg channel no vhost-vsock device, and the
    manifest's -fw_cfg option (its per-VM file shown as agent-config-UUID.json).

    qemu_args(q) stays the original's line, element for element (`print-qemu-cmd --original`).
    """
    fw_cfg = q.AGENT_CHANNEL == "fw_cfg"
    args = qemu_args(q, vsock_device=not fw_cfg)
    if fw_cfg:
        args += fw_cfg_args(Path(q.TMP_FILE_LOC) / "agent-config-UUID.json")
    return args


def fw_cfg_args(manifest_file: Path) -> list[str]:
    """The agent's manifest as a fw_cfg file, on hosts without vhost-vsock."""
    return ["-fw_cfg", f"name={FW_CFG_MANIFEST_NAME},file={escape_option(str(manifest_file))}"]


def vm_args(
    q: QemuSettings,
    vm: VmResources,
    *,
    manifest_file: Path | None,
    manifest: bytes,
    size: VmSize | None = None,
) -> list[str]:
    """One VM's arguments: the base line derived for this VM as the original did, no
    vhost-vsock device on the fw_cfg channel (the manifest goes as a fw_cfg file instead),
    and `manifest` bound into attestation with MANAGER_QEMU_BIND_MANIFEST."""
    fw_cfg = q.AGENT_CHANNEL == "fw_cfg"
    derived = derive_vm_settings(q, vm, size)
    args = qemu_args(derived, vsock_device=not fw_cfg, manifest=manifest)
    if fw_cfg and manifest_file is not None:
        args += fw_cfg_args(manifest_file)
    return args


CERTS_SHARE_TAG = "certs_share"
ENV_SHARE_TAG = "env_share"


def share_args(certs_dir: Path, env_dir: Path) -> list[str]:
    """The agent's two 9p shares as upstream gives them (mount tags certs_share, env_share),
    read-only: the agent only reads them, and a guest must not write into the daemon's tree."""
    args: list[str] = []
    for fsdev, path, tag in (
        ("cert_fs", certs_dir, CERTS_SHARE_TAG),
        ("env_fs", env_dir, ENV_SHARE_TAG),
    ):
        args += [
            "-fsdev",
            f"local,id={fsdev},path={escape_option(str(path))},security_model=mapped,readonly=on",
        ]
        args += ["-device", f"virtio-9p-pci,fsdev={fsdev},mount_tag={tag}"]
    return args


def cvm_args(
    q: QemuSettings,
    vm: VmResources,
    *,
    certs_dir: Path,
    env_dir: Path,
    kernel_parameter: str,
    payload: bytes,
    size: VmSize | None = None,
) -> list[str]:
    """A CreateVm'd VM's arguments: the base line derived for this VM, no vhost-vsock device
    and no manifest (its agent fetches its work itself), `kernel_parameter` appended to the
    kernel command line, the two shares last (as upstream), and `payload` (the environment
    file) bound into attestation with MANAGER_QEMU_BIND_MANIFEST."""
    derived = derive_vm_settings(q, vm, size)
    if kernel_parameter:
        derived = derived.model_copy(
            update={"KERNEL_CMDLINE": f"{derived.KERNEL_CMDLINE} {kernel_parameter}"}
        )
    return [
        *qemu_args(derived, vsock_device=False, manifest=payload),
        *share_args(certs_dir, env_dir),
    ]


def option_values(argv: Sequence[str], flag: str) -> list[str]:
    """Every value given to `flag` in a command line (`-append`, `-cpu`...), in order."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


@dataclass(frozen=True, slots=True)
class Executable:
    """What to exec: QEMU itself, or sudo with the resolved QEMU path as its first argument."""

    exe: str
    prefix: tuple[str, ...]

    def command(self, args: Sequence[str]) -> list[str]:
        """The original's line (`print-qemu-cmd`, the start-up log line)."""
        return [self.exe, *self.prefix, *args]

    @property
    def sudo(self) -> bool:
        return self.exe == "sudo"

    def vm_command(self, args: Sequence[str], keep_fds: Sequence[int] = ()) -> list[str]:
        """What one VM execs. Through sudo: `-n` (a sudo that wants a password fails at once
        instead of waiting on a terminal nobody reads) and `-C` above the descriptors QEMU
        must inherit (sudo closes every descriptor from 3 up otherwise, the QMP socket
        included); `--` ends sudo's options. Without sudo: the original's line."""
        if not self.sudo:
            return self.command(args)
        close_from = max(3, *(fd + 1 for fd in keep_fds))
        return [self.exe, "-n", "-C", str(close_from), "--", *self.prefix, *args]


def resolve_executable(
    q: QemuSettings, which: Callable[[str], str | None] = shutil.which
) -> Executable:
    """Looks BIN_PATH up on PATH once, at start-up, like Go's exec.LookPath."""
    qemu = which(q.BIN_PATH)
    if qemu is None:
        raise QemuNotFoundError(
            f"MANAGER_QEMU_BIN_PATH: {q.BIN_PATH!r} is not an executable file on PATH"
        )
    if q.USE_SUDO:
        # As the original: "sudo" by name, found on PATH when a VM starts.
        return Executable(exe="sudo", prefix=(qemu,))
    return Executable(exe=qemu, prefix=())


def shell_line(argv: Sequence[str]) -> str:
    """One line an operator can paste into a shell and get exactly this argv."""
    return shlex.join(argv)


@dataclass(frozen=True, slots=True)
class VmResources:
    """What one VM is given by the service: all the per-VM variation of the command line."""

    uuid: str
    host_port: int
    guest_cid: int
    vnc_display: int


@dataclass(frozen=True, slots=True)
class VmSize:
    """The size a Run asked for; 0 = the settings' MANAGER_QEMU_SMP_COUNT / _MEMORY_SIZE.
    Checked against the operator's ceilings before it gets here (vm/size.py)."""

    vcpus: int = 0
    memory_mib: int = 0


def vm_file_paths(q: QemuSettings, vm_uuid: str) -> dict[str, Path]:
    """The original's per-VM file names under TMP_FILE_LOC."""
    tmp = Path(q.TMP_FILE_LOC)
    paths = {
        "kernel": tmp / f"bzImage-{vm_uuid}",
        "rootfs": tmp / f"rootfs.cpio-{vm_uuid}.gz",
    }
    if not q.KERNEL_HASH and not uses_bios(q):
        paths["ovmf_vars"] = tmp / f"OVMF_VARS-{vm_uuid}.fd"
    return paths


def derive_vm_settings(
    q: QemuSettings, vm: VmResources, size: VmSize | None = None
) -> QemuSettings:
    """The base settings as the original rewrote them for one VM, and the size its Run asked
    for (-smp, -m and an SNP memory backend follow SMP_COUNT and MEMORY_SIZE, as does the
    launch measurement: one place, so they cannot disagree)."""
    paths = vm_file_paths(q, vm.uuid)
    update: dict[str, object] = {
        "NETDEV_ID": f"{q.NETDEV_ID}-{vm.uuid}",
        "SEV_ID": f"{q.SEV_ID}-{vm.uuid}",
        "TDX_ID": f"{q.TDX_ID}-{vm.uuid}",
        "DISK_IMG_KERNEL_FILE": str(paths["kernel"]),
        "DISK_IMG_ROOTFS_FILE": str(paths["rootfs"]),
        "HOST_FWD_AGENT": vm.host_port,
        "VSOCK_GUEST_CID": vm.guest_cid,
        "VSOCK_VNC": vm.vnc_display,
    }
    if "ovmf_vars" in paths:
        update["OVMF_VARS_FILE"] = str(paths["ovmf_vars"])
    if size is not None and size.vcpus:
        update["SMP_COUNT"] = size.vcpus
    if size is not None and size.memory_mib:
        update["MEMORY_SIZE"] = f"{size.memory_mib}M"
    return q.model_copy(update=update)
