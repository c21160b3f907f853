"""Checks of a confidential launch: settings that cannot work are refused at daemon start, and
`cocos-manager check` reports what this host and QEMU can launch."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from cocos_manager.confidential.argv import snp_object
from cocos_manager.confidential.modes import (
    ConfidentialConfigError,
    LaunchMode,
    launch_mode,
    qemu_binary,
    qemu_object_types,
    qemu_version,
    uses_bios,
)
from cocos_manager.config import QemuSettings


def check_settings(q: QemuSettings) -> None:
    """Combinations that cannot work, refused before any VM is tried."""
    if q.ENABLE_TDX and (q.ENABLE_SEV_SNP or q.ENABLE_SEV):
        raise ConfidentialConfigError(
            "MANAGER_QEMU_ENABLE_TDX: cannot be combined with MANAGER_QEMU_ENABLE_SEV_SNP or "
            "MANAGER_QEMU_ENABLE_SEV (set them to false)"
        )
    mode = launch_mode(q)
    if q.BIND_MANIFEST and mode not in (LaunchMode.SNP_UPSTREAM, LaunchMode.TDX):
        raise ConfidentialConfigError(
            "MANAGER_QEMU_BIND_MANIFEST: needs MANAGER_QEMU_ENABLE_SEV_SNP with "
            "MANAGER_QEMU_SEV_SNP_SYNTAX=upstream (or auto on an upstream QEMU), or "
            "MANAGER_QEMU_ENABLE_TDX"
        )
    if bool(q.SEV_SNP_ID_BLOCK_FILE) != bool(q.SEV_SNP_ID_AUTH_FILE):
        raise ConfidentialConfigError(
            "MANAGER_QEMU_SEV_SNP_ID_BLOCK_FILE: set together with "
            "MANAGER_QEMU_SEV_SNP_ID_AUTH_FILE (an ID block is only checked with its signature)"
        )
    if q.SEV_SNP_ID_BLOCK_FILE and mode is not LaunchMode.SNP_UPSTREAM:
        raise ConfidentialConfigError(
            "MANAGER_QEMU_SEV_SNP_ID_BLOCK_FILE: needs MANAGER_QEMU_SEV_SNP_SYNTAX=upstream"
        )
    if mode is LaunchMode.SNP_UPSTREAM:
        snp_object(q, None)  # reads the ID block files: a bad one is refused now
    if uses_bios(q) and not os.path.isfile(q.BIOS_FILE):
        raise ConfidentialConfigError(
            f"MANAGER_QEMU_BIOS_FILE: {q.BIOS_FILE!r} does not exist or is not a file"
        )


_OBJECT_FOR_MODE = {
    LaunchMode.SNP_UPSTREAM: ("sev-snp-guest", "memory-backend-memfd"),
    LaunchMode.SEV_UPSTREAM: ("sev-guest",),
    LaunchMode.TDX: ("tdx-guest",),
}


def check_confidential_launch(
    q: QemuSettings, which: Callable[[str], str | None] = shutil.which
) -> LaunchMode:
    """Called once at daemon start (and by print-qemu-cmd): refuses settings that ask for a
    technology or syntax the QEMU binary lacks, with one line naming the setting. The seed
    syntax is not probed (AMD's fork cannot be told apart by its object list, and the default
    settings must keep starting on hosts without SNP; `cocos-manager check` warns there)."""
    check_settings(q)
    mode = launch_mode(q)
    needed = _OBJECT_FOR_MODE.get(mode)
    if needed is None:
        return mode
    binary = qemu_binary(q, which)
    if binary is None:  # the binary, not the mode, is what is wrong: say so
        raise ConfidentialConfigError(
            f"MANAGER_QEMU_BIN_PATH: {q.BIN_PATH!r} is not an executable file on PATH"
        )
    known = qemu_object_types(binary)
    missing = [name for name in needed if name not in known]
    if missing:
        version = qemu_version(binary)
        setting = (
            "MANAGER_QEMU_ENABLE_TDX=true"
            if mode is LaunchMode.TDX
            else f"MANAGER_QEMU_SEV_SNP_SYNTAX={q.SEV_SNP_SYNTAX.value}"
        )
        raise ConfidentialConfigError(
            f"{setting}: QEMU {q.BIN_PATH!r} ({version or 'did not answer'}) "
            f"has no {', '.join(missing)} object"
            + (" (TDX needs QEMU 10.1 or later)" if mode is LaunchMode.TDX else "")
        )
    return mode


# -- host readiness (for `cocos-manager check`) --------------------------------------------

CheckResult = tuple[str, str, str]  # (name, "pass" | "info" | "warn" | "fail", detail)


def _read_param(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _enabled(value: str | None) -> bool:
    return value is not None and value.upper() in ("Y", "1")


def confidential_host_checks(
    q: QemuSettings,
    *,
    sys_root: Path = Path("/"),
    which: Callable[[str], str | None] = shutil.which,
) -> list[CheckResult]:
    """Whether this host and QEMU can launch what the settings ask for. What the settings ask
    for and the host lacks is a failure (with the fix, and the setting that turns the feature
    off); what they do not ask for is `info`: what the host could do, no advice."""
    mode = launch_mode(q)
    wants_snp = mode in (LaunchMode.SNP_SEED, LaunchMode.SNP_UPSTREAM)
    wants_sev = mode in (LaunchMode.SEV, LaunchMode.SEV_UPSTREAM)
    wants_tdx = mode is LaunchMode.TDX
    amd = sys_root / "sys/module/kvm_amd/parameters"
    intel = sys_root / "sys/module/kvm_intel/parameters"
    results: list[CheckResult] = []
    off = (
        "MANAGER_QEMU_ENABLE_SEV_SNP=false"
        if wants_snp
        else "MANAGER_QEMU_ENABLE_SEV=false"
        if wants_sev
        else "MANAGER_QEMU_ENABLE_TDX=false"
    )

    def add(name: str, ok: bool, wanted: bool, good: str, bad: str, fix: str) -> None:
        if ok:
            results.append((name, "pass", good))
        elif wanted:
            results.append((name, "fail", f"{bad}: {fix}; or set {off} (no confidential VM)"))
        else:  # not asked for: what the host lacks, said without advice
            results.append((name, "info", f"{bad} (not asked for by the settings)"))

    sev = _read_param(amd / "sev")
    add(
        "kvm_amd sev",
        _enabled(sev),
        wants_sev or wants_snp,
        "SEV is enabled in KVM",
        "SEV is off or kvm_amd is not loaded (/sys/module/kvm_amd/parameters/sev)",
        "enable SEV in the BIOS, load kvm_amd with sev=1",
    )
    snp = _read_param(amd / "sev_snp")
    add(
        "kvm_amd sev_snp",
        _enabled(snp),
        wants_snp,
        "SEV-SNP is enabled in KVM",
        "SEV-SNP is off (/sys/module/kvm_amd/parameters/sev_snp)",
        "enable SNP and SMEE in the BIOS, a host kernel 6.11 or later, kvm_amd sev_snp=1",
    )
    dev_sev = sys_root / "dev/sev"
    add(
        "/dev/sev",
        dev_sev.exists(),
        wants_sev or wants_snp,
        "the SEV firmware device exists",
        "/dev/sev is missing",
        "load the ccp module and the SEV firmware",
    )
    tdx = _read_param(intel / "tdx")
    add(
        "kvm_intel tdx",
        _enabled(tdx),
        wants_tdx,
        "TDX is enabled in KVM",
        "TDX is off (/sys/module/kvm_intel/parameters/tdx)",
        "a TDX-capable CPU and BIOS, a host kernel 6.16 or later, kvm_intel tdx=1",
    )
    binary = qemu_binary(q, which)
    known = qemu_object_types(binary) if binary else frozenset()
    version = (qemu_version(binary) if binary else "") or "no answer"
    add(
        "QEMU sev-snp-guest (upstream)",
        "sev-snp-guest" in known and "memory-backend-memfd" in known,
        mode is LaunchMode.SNP_UPSTREAM,
        f"{version} knows sev-snp-guest and memory-backend-memfd",
        f"{version} lacks upstream SEV-SNP",
        "install QEMU 9.1 or later (Debian: bookworm-backports qemu-system-x86)",
    )
    add(
        "QEMU tdx-guest",
        "tdx-guest" in known,
        wants_tdx,
        f"{version} knows tdx-guest",
        f"{version} lacks tdx-guest",
        "TDX needs QEMU 10.1 or later",
    )
    if mode is LaunchMode.SNP_SEED:
        results.append(
            (
                "SEV-SNP syntax",
                "warn",
                "MANAGER_QEMU_SEV_SNP_SYNTAX=seed writes AMD's old fork's flags "
                "(memory-backend-memfd-private, kvm-type=protected) that upstream QEMU rejects: "
                "set it to upstream or auto on QEMU 9.1 or later",
            )
        )
    if q.BIND_MANIFEST and mode in (LaunchMode.SNP_UPSTREAM, LaunchMode.TDX):
        results.append(("manifest bound into attestation", "pass", _binding_detail(mode)))
    return results


def _binding_detail(mode: LaunchMode) -> str:
    if mode is LaunchMode.TDX:
        return "each VM's MRCONFIGID is the SHA-384 of its manifest"
    return "each VM's HOST_DATA is the SHA-256 of its manifest"
