"""Confidential launch: which technology and syntax a VM is launched with.

The seed spelled SEV-SNP with flags of AMD's old QEMU fork (`memory-backend-memfd-private`,
`kvm-type=protected`); hosts today run upstream QEMU (9.1 and later), which spells it
`confidential-guest-support` + `memory-backend-memfd` + `sev-snp-guest,policy=...` with the
firmware given by `-bios`. The seed syntax stays the default so the original command line is
unchanged; `MANAGER_QEMU_SEV_SNP_SYNTAX=upstream|auto` switches.

QEMU's object list and version are asked once per binary and cached: they do not change while
the daemon runs, and `auto` must not run QEMU for every VM.

The command-line pieces are in confidential/argv.py, the checks of settings, host and QEMU in
confidential/checks.py.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from enum import StrEnum

from cocos_manager.config import QemuSettings, SnpSyntax

PROBE_TIMEOUT = 10.0


class ConfidentialConfigError(Exception):
    """The settings ask for a confidential launch this host or QEMU cannot do: one line naming
    the setting; the daemon refuses to start with it."""


class LaunchMode(StrEnum):
    NONE = "none"
    SEV = "sev"  # plain SEV, as the seed spells it
    SEV_UPSTREAM = "sev-upstream"  # plain SEV, upstream spelling (no `discard`)
    SNP_SEED = "sev-snp-seed"
    SNP_UPSTREAM = "sev-snp"
    TDX = "tdx"


# -- probing QEMU (once per binary) -------------------------------------------------------


def _qemu_stdout(binary: str, *args: str) -> str:
    """What QEMU prints for a query option ("" if it cannot run)."""
    try:
        done = subprocess.run(
            [binary, *args],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


@functools.cache
def qemu_object_types(binary: str) -> frozenset[str]:
    """`qemu -object help`: the object types this QEMU can create (empty if it cannot run)."""
    lines = _qemu_stdout(binary, "-object", "help").splitlines()[1:]  # after the title line
    return frozenset(line.strip() for line in lines if line.strip())


@functools.cache
def qemu_version(binary: str) -> str:
    """QEMU's first `-version` line ("" if it cannot run): verifiers want to know which
    QEMU built the guest's initial state."""
    lines = _qemu_stdout(binary, "-version").splitlines()
    return lines[0].strip() if lines else ""


def qemu_binary(q: QemuSettings, which: Callable[[str], str | None] = shutil.which) -> str | None:
    return which(q.BIN_PATH)


def _fork_qemu(q: QemuSettings) -> bool:
    """AMD's fork is the one QEMU with memory-backend-memfd-private."""
    binary = qemu_binary(q)
    return binary is not None and "memory-backend-memfd-private" in qemu_object_types(binary)


def launch_mode(q: QemuSettings) -> LaunchMode:
    """Which technology and syntax these settings launch with (AUTO probes QEMU once)."""
    if q.ENABLE_TDX:
        return LaunchMode.TDX
    if not (q.ENABLE_SEV_SNP or q.ENABLE_SEV):
        return LaunchMode.NONE
    syntax = q.SEV_SNP_SYNTAX
    if syntax is SnpSyntax.AUTO:
        syntax = SnpSyntax.SEED if _fork_qemu(q) else SnpSyntax.UPSTREAM
    upstream = syntax is SnpSyntax.UPSTREAM
    if q.ENABLE_SEV_SNP:
        return LaunchMode.SNP_UPSTREAM if upstream else LaunchMode.SNP_SEED
    return LaunchMode.SEV_UPSTREAM if upstream else LaunchMode.SEV


def uses_bios(q: QemuSettings) -> bool:
    """Upstream SEV-SNP and TDX boot one firmware image by -bios: no pflash, no vars copy."""
    return launch_mode(q) in (LaunchMode.SNP_UPSTREAM, LaunchMode.TDX)


def firmware_file(q: QemuSettings) -> str:
    """The firmware image QEMU loads (and an SNP measurement covers)."""
    return q.BIOS_FILE if uses_bios(q) else q.OVMF_CODE_FILE


def launched_binding(argv: Sequence[str]) -> dict[str, str]:
    """host-data / mrconfigid as a running VM's QEMU actually got them (its argv), so what a
    verifier is told is what was launched, not what the settings would give now."""
    found: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("sev-snp-guest,"):
            for prop in arg.split(","):
                key, _, value = prop.partition("=")
                if key == "host-data":
                    found["host_data"] = value
        elif arg.startswith("{") and '"tdx-guest"' in arg:
            try:
                obj = json.loads(arg)
            except ValueError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("mrconfigid"), str):
                found["mrconfigid"] = obj["mrconfigid"]
    return found


def launched_mode(argv: Sequence[str]) -> str:
    """The confidential launch a running VM's QEMU actually got (its argv): "sev-snp", "sev",
    "tdx", or "none"; the settings may have changed since."""
    for arg in argv:
        if arg.startswith("sev-snp-guest,") or '"sev-snp-guest"' in arg:
            return "sev-snp"
        if arg.startswith("sev-guest,") or '"sev-guest"' in arg:
            return "sev"
        if arg.startswith("tdx-guest,") or '"tdx-guest"' in arg:
            return "tdx"
    return "none"
