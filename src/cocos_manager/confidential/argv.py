"""The confidential pieces of QEMU's command line: the SEV / SEV-SNP / TDX guest objects, the
memory backend and the firmware, for the upstream syntax (the seed's are in qemu/argv.py).

A verifier can only trust a VM whose launch data it can check: with MANAGER_QEMU_BIND_MANIFEST
the SHA-256 of the exact manifest bytes the agent receives becomes SNP `host-data` (TDX:
SHA-384 as `mrconfigid`), which the hardware copies into every attestation report.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cocos_manager.confidential.modes import ConfidentialConfigError, LaunchMode, launch_mode
from cocos_manager.config import QemuSettings

ID_BLOCK_SIZE = 96  # struct sev_snp_id_block
ID_AUTH_SIZE = 4096  # struct sev_snp_id_authentication


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


@dataclass(frozen=True, slots=True)
class ConfidentialArgs:
    """What a non-seed confidential launch puts where the seed had its own options: the
    firmware (instead of the pflash drives), the memory backend (the seed's step 11) and the
    guest object with its machine link (the seed's step 13)."""

    mode: LaunchMode
    firmware: list[str] = field(default_factory=list)
    memory: list[str] = field(default_factory=list)
    guest: list[str] = field(default_factory=list)


def snp_object(q: QemuSettings, manifest: bytes | None) -> str:
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


def escape_option(value: str) -> str:
    """QEMU splits option lists at single commas: a path keeps its commas by doubling them
    (a path without commas, as the defaults, is unchanged). Here rather than in qemu_argv,
    which imports this module, so both command-line builders use the one escape."""
    return value.replace(",", ",,")


def pflash_drives(q: QemuSettings) -> list[str]:
    """The seed's firmware: OVMF code, and unless KERNEL_HASH the VM's own vars copy."""
    drives = [
        "-drive",
        f"if={q.OVMF_CODE_IF},format={q.OVMF_CODE_FORMAT},unit={q.OVMF_CODE_UNIT},"
        f"file={escape_option(q.OVMF_CODE_FILE)},readonly={q.OVMF_CODE_READONLY}",
    ]
    if not q.KERNEL_HASH:
        drives += [
            "-drive",
            f"if={q.OVMF_VARS_IF},format={q.OVMF_VARS_FORMAT},unit={q.OVMF_VARS_UNIT},"
            f"file={escape_option(q.OVMF_VARS_FILE)}",
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
                snp_object(q, manifest),
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
