"""Probes of the host's kernel and devices: /dev/kvm makes a VM, vhost-vsock opens, and what
kvm_amd / kvm_intel report of SEV, SEV-SNP and TDX.

They read files in /dev and /sys only (no QEMU run), so the daemon's start-up warnings use
them too; `Host` lets tests point them at a fake tree.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cocos_manager.config import AgentChannel, Settings
from cocos_manager.host.check_result import Check, Status

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12


@dataclass(frozen=True, slots=True)
class Host:
    """Where the probes look: the real root, or a fake tree in tests."""

    dev: Path = Path("/dev")
    sys_module: Path = Path("/sys/module")
    cpuinfo: Path = Path("/proc/cpuinfo")
    environ: Mapping[str, str] | None = None
    kvm_probe: Callable[[Path], str | None] = field(default=lambda path: kvm_creates_vm(path))

    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ


def _open_device(path: Path) -> OSError | int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return error


def _parameter(host: Host, module: str, name: str) -> bool | None:
    """A kvm module parameter as a bool: None when the module (or parameter) is not there."""
    try:
        text = (host.sys_module / module / "parameters" / name).read_text().strip()
    except OSError:
        return None
    return text in ("Y", "y", "1")


def kvm_creates_vm(kvm: Path) -> str | None:
    """None when the device makes a VM; otherwise why not."""
    opened = _open_device(kvm)
    if isinstance(opened, OSError):
        if opened.errno == errno.ENOENT:
            return "is missing"
        return f"cannot be opened ({opened.strerror})"
    try:
        version = fcntl.ioctl(opened, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return f"speaks KVM API {version}, not {KVM_API_VERSION}"
        os.close(fcntl.ioctl(opened, KVM_CREATE_VM, 0))
    except OSError as error:
        return f"cannot create a VM ({error.strerror})"
    finally:
        os.close(opened)
    return None


def check_kvm(settings: Settings, host: Host) -> Check:
    kvm = host.dev / "kvm"
    if not settings.qemu.ENABLE_KVM:
        note = " (this host has /dev/kvm)" if kvm.exists() else ""
        return Check("kvm", "pass", f"MANAGER_QEMU_ENABLE_KVM=false: QEMU runs TCG{note}")
    why = host.kvm_probe(kvm)
    if why is not None:
        return Check(
            "kvm",
            "fail",
            f"MANAGER_QEMU_ENABLE_KVM=true but {kvm} {why}: load kvm_amd or kvm_intel (and give "
            "the daemon access), or set MANAGER_QEMU_ENABLE_KVM=false to run under TCG",
        )
    hardware = [m for m in ("kvm_amd", "kvm_intel") if (host.sys_module / m).exists()]
    if not hardware:
        return Check(
            "kvm",
            "warn",
            f"{kvm} creates VMs, but neither kvm_amd nor kvm_intel is loaded (another KVM "
            "provider, or a nested host): if guests crash or Runs fail, set "
            "MANAGER_QEMU_ENABLE_KVM=false (TCG)",
        )
    if _is_guest(host):
        return Check(
            "kvm",
            "warn",
            f"{kvm} ({', '.join(hardware)}) works, but this host is itself a VM (nested KVM): "
            "if guests crash, set MANAGER_QEMU_ENABLE_KVM=false (TCG)",
        )
    return Check("kvm", "pass", f"{kvm} creates VMs ({', '.join(hardware)}, KVM API 12)")


def _is_guest(host: Host) -> bool:
    """The CPU's hypervisor flag: this host runs under a hypervisor."""
    try:
        text = host.cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\bhypervisor\b", text, re.M) is not None


def check_agent_channel(settings: Settings, host: Host) -> Check:
    if settings.qemu.AGENT_CHANNEL is AgentChannel.FW_CFG:
        return Check(
            "agent-channel",
            "pass",
            "MANAGER_QEMU_AGENT_CHANNEL=fw_cfg: the manifest goes in by -fw_cfg, no vsock device",
        )
    device = host.dev / "vhost-vsock"
    opened = _open_device(device)
    if isinstance(opened, OSError):
        why = (
            "is missing"
            if opened.errno == errno.ENOENT
            else f"cannot be opened ({opened.strerror})"
        )
        return Check(
            "agent-channel",
            "fail",
            f"MANAGER_QEMU_AGENT_CHANNEL=vsock but {device} {why}: `modprobe vhost_vsock`, or "
            "set MANAGER_QEMU_AGENT_CHANNEL=fw_cfg",
        )
    os.close(opened)
    return Check("agent-channel", "pass", f"MANAGER_QEMU_AGENT_CHANNEL=vsock: {device} opens")


def check_sev(settings: Settings, host: Host) -> list[Check]:
    """SEV / SEV-SNP as kvm_amd reports them, and TDX as kvm_intel does (report only)."""
    q = settings.qemu
    sev = _parameter(host, "kvm_amd", "sev")
    snp = _parameter(host, "kvm_amd", "sev_snp")
    tdx = _parameter(host, "kvm_intel", "tdx")
    dev_sev = (host.dev / "sev").exists()
    checks = []
    if q.ENABLE_SEV_SNP:
        if snp and dev_sev:
            checks.append(Check("sev-snp", "pass", "kvm_amd sev_snp=Y and /dev/sev present"))
        else:
            missing = []
            if snp is None:
                missing.append("kvm_amd is not loaded (or has no sev_snp parameter)")
            elif not snp:
                missing.append("kvm_amd sev_snp is N")
            if not dev_sev:
                missing.append(f"{host.dev / 'sev'} is missing")
            checks.append(
                Check(
                    "sev-snp",
                    "fail",
                    "MANAGER_QEMU_ENABLE_SEV_SNP=true (the default) but "
                    + "; ".join(missing)
                    + ": enable SEV-SNP in the BIOS and kvm_amd, or set "
                    "MANAGER_QEMU_ENABLE_SEV_SNP=false (no confidential VM)",
                )
            )
    elif q.ENABLE_SEV:
        if sev and dev_sev:
            checks.append(Check("sev", "pass", "kvm_amd sev=Y and /dev/sev present"))
        else:
            state = "not loaded" if sev is None else ("sev=N" if not sev else "loaded")
            extra = "" if dev_sev else f", {host.dev / 'sev'} missing"
            checks.append(
                Check(
                    "sev",
                    "fail",
                    f"MANAGER_QEMU_ENABLE_SEV=true but kvm_amd is {state}{extra}: enable SEV in "
                    "the BIOS and kvm_amd, or set MANAGER_QEMU_ENABLE_SEV=false",
                )
            )
    else:
        have = [n for n, v in (("SEV", sev), ("SEV-SNP", snp), ("TDX", tdx)) if v]
        checks.append(
            Check(
                "confidential",
                "pass",
                "SEV and SEV-SNP off (MANAGER_QEMU_ENABLE_SEV*=false): VMs are not confidential"
                + (f"; this host offers {', '.join(have)}" if have else ""),
            )
        )
    if tdx is not None:  # what the host offers; the confidential checks judge a TDX launch
        status: Status = "pass" if q.ENABLE_TDX and tdx else "info"
        checks.append(Check("tdx", status, f"kvm_intel tdx={'Y' if tdx else 'N'} (report only)"))
    return checks
