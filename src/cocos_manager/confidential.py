"""Confidential launch: which technology and syntax a VM is launched with, and its pieces.

The seed spelled SEV-SNP with flags of AMD's old QEMU fork (`memory-backend-memfd-private`,
`kvm-type=protected`); hosts today run upstream QEMU (9.1 and later), which spells it
`confidential-guest-support` + `memory-backend-memfd` + `sev-snp-guest,policy=...` with the
firmware given by `-bios`. The seed syntax stays the default so the original command line is
unchanged; `MANAGER_QEMU_SEV_SNP_SYNTAX=upstream|auto` switches.

A verifier can only trust a VM whose launch data it can check: with MANAGER_QEMU_BIND_MANIFEST
the SHA-256 of the exact manifest bytes the agent receives becomes SNP `host-data` (TDX:
SHA-384 as `mrconfigid`), which the hardware copies into every attestation report.

QEMU's object list and version are asked once per binary and cached: they do not change while
the daemon runs, and `auto` must not run QEMU for every VM.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cocos_manager.settings import QemuSettings, SnpSyntax

ID_BLOCK_SIZE = 96  # struct sev_snp_id_block
ID_AUTH_SIZE = 4096  # struct sev_snp_id_authentication
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


# -- the manifest bound into attestation --------------------------------------------------


def host_data(manifest: bytes) -> str:
    """SNP host-data: base64 of SHA-256 over the exact manifest bytes the agent receives."""
    return base64.b64encode(hashlib.sha256(manifest).digest()).decode()


def mrconfigid(manifest: bytes) -> str:
    """TDX MRCONFIGID: base64 of SHA-384 over the same bytes (48 bytes, the field's size)."""
    return base64.b64encode(hashlib.sha384(manifest).digest()).decode()


def read_launch_blob(path: str, size: int, variable: str) -> str:
    """An ID block / ID auth file as QEMU wants it (base64): raw bytes of the structure's
    exact size, or that already base64-encoded (what `snp-create-id-block` tools print)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfidentialConfigError(
            f"{variable}: cannot read {path!r}: {error.strerror}"
        ) from None
    if len(data) == size:
        return base64.b64encode(data).decode()
    try:
        decoded = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == size:
        return base64.b64encode(decoded).decode()
    raise ConfidentialConfigError(
        f"{variable}: {path!r} must hold {size} bytes (raw or base64), found {len(data)} bytes"
    )


# -- command-line pieces ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfidentialArgs:
    """What a non-seed confidential launch puts where the seed had its own options: the
    firmware (instead of the pflash drives), the memory backend (the seed's step 11) and the
    guest object with its machine link (the seed's step 13)."""

    mode: LaunchMode
    firmware: list[str] = field(default_factory=list)
    memory: list[str] = field(default_factory=list)
    guest: list[str] = field(default_factory=list)


def _snp_object(q: QemuSettings, manifest: bytes | None) -> str:
    props = [
        f"sev-snp-guest,id={q.SEV_ID}",
        f"cbitpos={q.SEV_CBITPOS}",
        f"reduced-phys-bits={q.SEV_REDUCED_PHYS_BITS}",
        f"policy={q.SEV_SNP_POLICY:#x}",
    ]
    if q.KERNEL_HASH:
        props.append("kernel-hashes=on")
    if q.BIND_MANIFEST and manifest is not None:
        props.append(f"host-data={host_data(manifest)}")
    if q.SEV_SNP_ID_BLOCK_FILE:
        props.append(
            "id-block="
            + read_launch_blob(
                q.SEV_SNP_ID_BLOCK_FILE, ID_BLOCK_SIZE, "MANAGER_QEMU_SEV_SNP_ID_BLOCK_FILE"
            )
        )
        props.append(
            "id-auth="
            + read_launch_blob(
                q.SEV_SNP_ID_AUTH_FILE, ID_AUTH_SIZE, "MANAGER_QEMU_SEV_SNP_ID_AUTH_FILE"
            )
        )
        props.append(f"author-key-enabled={'on' if q.SEV_SNP_AUTHOR_KEY_ENABLED else 'off'}")
    return ",".join(props)


def quote_generation_socket(value: str) -> dict[str, str]:
    """MANAGER_QEMU_TDX_QUOTE_GENERATION_SOCKET as QEMU's SocketAddress."""
    if value.startswith("/"):
        return {"type": "unix", "path": value}
    _, cid, port = value.split(":")
    return {"type": "vsock", "cid": cid, "port": port}


def _tdx_object(q: QemuSettings, manifest: bytes | None) -> str:
    """JSON, because quote-generation-socket is a structure (QEMU's documented spelling)."""
    obj: dict[str, object] = {"qom-type": "tdx-guest", "id": q.TDX_ID}
    if q.BIND_MANIFEST and manifest is not None:
        obj["mrconfigid"] = mrconfigid(manifest)
    if q.TDX_QUOTE_GENERATION_SOCKET:
        obj["quote-generation-socket"] = quote_generation_socket(q.TDX_QUOTE_GENERATION_SOCKET)
    return json.dumps(obj, separators=(",", ":"))


def _escape_opt(value: str) -> str:
    """QEMU splits option lists at single commas: a path keeps its commas by doubling them
    (a path without commas, as the defaults, is unchanged)."""
    return value.replace(",", ",,")


def pflash_drives(q: QemuSettings) -> list[str]:
    """The seed's firmware: OVMF code, and unless KERNEL_HASH the VM's own vars copy."""
    drives = [
        "-drive",
        f"if={q.OVMF_CODE_IF},format={q.OVMF_CODE_FORMAT},unit={q.OVMF_CODE_UNIT},"
        f"file={_escape_opt(q.OVMF_CODE_FILE)},readonly={q.OVMF_CODE_READONLY}",
    ]
    if not q.KERNEL_HASH:
        drives += [
            "-drive",
            f"if={q.OVMF_VARS_IF},format={q.OVMF_VARS_FORMAT},unit={q.OVMF_VARS_UNIT},"
            f"file={_escape_opt(q.OVMF_VARS_FILE)}",
        ]
    return drives


def confidential_args(q: QemuSettings, manifest: bytes | None = None) -> ConfidentialArgs | None:
    """The upstream pieces (each replacing the seed's in place, firmware drives included), or
    None where the seed's own options apply unchanged.

    `manifest` is the VM's manifest (None for the base command line): with BIND_MANIFEST its
    digest becomes host-data / mrconfigid.
    """
    mode = launch_mode(q)
    if mode is LaunchMode.SNP_UPSTREAM:
        return ConfidentialArgs(
            mode=mode,
            firmware=["-bios", q.BIOS_FILE],
            memory=[
                "-object",
                f"memory-backend-memfd,id={q.MEM_ID},size={q.MEMORY_SIZE},share=true",
                "-machine",
                f"memory-backend={q.MEM_ID}",
            ],
            guest=[
                "-object",
                _snp_object(q, manifest),
                "-machine",
                f"confidential-guest-support={q.SEV_ID}",
            ],
        )
    if mode is LaunchMode.SEV_UPSTREAM:
        # Plain SEV keeps the pflash firmware and needs no private memory backend.
        hashes = ",kernel-hashes=on" if q.KERNEL_HASH else ""
        return ConfidentialArgs(
            mode=mode,
            firmware=pflash_drives(q),
            guest=[
                "-object",
                f"sev-guest,id={q.SEV_ID},cbitpos={q.SEV_CBITPOS},"
                f"reduced-phys-bits={q.SEV_REDUCED_PHYS_BITS}{hashes}",
                "-machine",
                f"confidential-guest-support={q.SEV_ID}",
            ],
        )
    if mode is LaunchMode.TDX:
        return ConfidentialArgs(
            mode=mode,
            firmware=["-bios", q.BIOS_FILE],
            guest=[
                "-object",
                _tdx_object(q, manifest),
                "-machine",
                f"confidential-guest-support={q.TDX_ID},kernel-irqchip=split",
            ],
        )
    return None


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


# -- start-up check -----------------------------------------------------------------------


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
        _snp_object(q, None)  # reads the ID block files: a bad one is refused now
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

CheckResult = tuple[str, str, str]  # (name, "pass" | "warn" | "fail", detail with what to do)


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
    for and the host lacks is a failure; the rest is said as a warning or a pass, so an
    operator also learns what the host could do."""
    mode = launch_mode(q)
    wants_snp = mode in (LaunchMode.SNP_SEED, LaunchMode.SNP_UPSTREAM)
    wants_sev = mode in (LaunchMode.SEV, LaunchMode.SEV_UPSTREAM)
    wants_tdx = mode is LaunchMode.TDX
    amd = sys_root / "sys/module/kvm_amd/parameters"
    intel = sys_root / "sys/module/kvm_intel/parameters"
    results: list[CheckResult] = []

    def add(name: str, ok: bool, wanted: bool, good: str, bad: str) -> None:
        results.append(
            (name, "pass" if ok else ("fail" if wanted else "warn"), good if ok else bad)
        )

    sev = _read_param(amd / "sev")
    add(
        "kvm_amd sev",
        _enabled(sev),
        wants_sev or wants_snp,
        "SEV is enabled in KVM",
        "SEV is off or kvm_amd is not loaded (/sys/module/kvm_amd/parameters/sev): enable SEV "
        "in the BIOS, load kvm_amd with sev=1",
    )
    snp = _read_param(amd / "sev_snp")
    add(
        "kvm_amd sev_snp",
        _enabled(snp),
        wants_snp,
        "SEV-SNP is enabled in KVM",
        "SEV-SNP is off (/sys/module/kvm_amd/parameters/sev_snp): enable SNP and SMEE in the "
        "BIOS, a host kernel 6.11 or later, kvm_amd sev_snp=1; or set "
        "MANAGER_QEMU_ENABLE_SEV_SNP=false",
    )
    dev_sev = sys_root / "dev/sev"
    add(
        "/dev/sev",
        dev_sev.exists(),
        wants_sev or wants_snp,
        "the SEV firmware device exists",
        "/dev/sev is missing: the ccp module and SEV firmware are not loaded",
    )
    tdx = _read_param(intel / "tdx")
    add(
        "kvm_intel tdx",
        _enabled(tdx),
        wants_tdx,
        "TDX is enabled in KVM",
        "TDX is off (/sys/module/kvm_intel/parameters/tdx): a TDX-capable CPU and BIOS, a host "
        "kernel 6.16 or later, kvm_intel tdx=1; or set MANAGER_QEMU_ENABLE_TDX=false",
    )
    binary = qemu_binary(q, which)
    known = qemu_object_types(binary) if binary else frozenset()
    version = (qemu_version(binary) if binary else "") or "no answer"
    add(
        "QEMU sev-snp-guest (upstream)",
        "sev-snp-guest" in known and "memory-backend-memfd" in known,
        mode is LaunchMode.SNP_UPSTREAM,
        f"{version} knows sev-snp-guest and memory-backend-memfd",
        f"{version} lacks upstream SEV-SNP: install QEMU 9.1 or later (Debian: "
        "bookworm-backports qemu-system-x86)",
    )
    add(
        "QEMU tdx-guest",
        "tdx-guest" in known,
        wants_tdx,
        f"{version} knows tdx-guest",
        f"{version} lacks tdx-guest: TDX needs QEMU 10.1 or later",
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
