"""What a VM was launched with, as far as its attestation goes: recorded at launch in its VM
record, so that AttestationPolicy describes the VM as launched (attestation.py), not as the
settings or the files on disk would launch one now.

A running VM's expected measurement depends on its vCPU count and type, the guest features,
its firmware, and (with kernel hashes) its kernel, initrd and command line. The settings may
change under it (a restart with another MANAGER_QEMU_SMP_COUNT adopts it as it is), and so
may the firmware file (an OVMF package upgrade): the values are taken from the settings QEMU
was given, once, and each file's SHA-256 at launch is kept beside its path, so a file that
changed since is found out rather than measured. The record form is the JSON object of
docs/contracts.md, "VM records"; this module owns its shape.

No sev-snp-measure here: this runs on every confidential launch, attestation.py only when
asked.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from cocos_manager.confidential import (
    LaunchMode,
    firmware_file,
    launch_mode,
    qemu_binary,
    qemu_version,
)
from cocos_manager.config import QemuSettings
from cocos_manager.errors import FailedPreconditionError

LAUNCH_VERSION = 1


@dataclass(frozen=True, slots=True)
class MeasurementInputs:
    """Everything the SNP launch measurement depends on, as QEMU is given it."""

    firmware: str
    kernel: str | None  # None: no kernel-hashes table (the firmware's page stays zero)
    initrd: str | None
    append: str | None
    vcpus: int
    vcpu_type: str
    guest_features: int


def measurement_inputs(q: QemuSettings) -> MeasurementInputs:
    """From a VM's settings (derive_vm_settings: its own kernel and rootfs files). Kernel,
    initrd and command line are measured only with kernel hashes, as QEMU only then puts
    their hashes into the firmware's table."""
    hashes = q.KERNEL_HASH
    return MeasurementInputs(
        firmware=firmware_file(q),
        kernel=q.DISK_IMG_KERNEL_FILE if hashes else None,
        initrd=q.DISK_IMG_ROOTFS_FILE if hashes else None,
        append=q.KERNEL_CMDLINE if hashes else None,
        vcpus=q.SMP_COUNT,
        vcpu_type=q.CPU,
        guest_features=q.SEV_SNP_GUEST_FEATURES,
    )


@dataclass(frozen=True, slots=True)
class Launch:
    """A VM's attestation-relevant launch: `files` maps "firmware", "kernel", "initrd" (those
    that are measured or reported) to [path, SHA-256 hex at launch, or None if unreadable]."""

    mode: LaunchMode
    qemu_version: str = ""
    inputs: MeasurementInputs | None = None  # SEV-SNP only
    policy: int = 0
    id_block: bool = False
    author_key: bool = False
    files: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "version": LAUNCH_VERSION,
            "mode": self.mode.value,
            "qemu_version": self.qemu_version,
            "files": {name: list(entry) for name, entry in self.files.items()},
        }
        if self.inputs is not None:
            record["inputs"] = asdict(self.inputs)
            record["policy"] = self.policy
            record["id_block"] = self.id_block
            record["author_key"] = self.author_key
        return record


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(path: str) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None  # QEMU will say why it cannot read it; AttestationPolicy refuses


def launch_of(q: QemuSettings, version: str | None = None) -> Launch:
    """What a VM with these settings (derive_vm_settings: its own kernel and rootfs links) is
    launched with. Blocking (hashes firmware, kernel and initrd): run it in a worker thread.
    `version`: QEMU's -version line if known, else asked of the binary (cached)."""
    mode = launch_mode(q)
    if version is None:
        binary = qemu_binary(q)
        version = qemu_version(binary) if binary else ""
    if mode is LaunchMode.TDX:
        return Launch(mode, version, files={"firmware": (q.BIOS_FILE, _digest(q.BIOS_FILE))})
    if mode not in (LaunchMode.SNP_SEED, LaunchMode.SNP_UPSTREAM):
        return Launch(mode, version)
    inputs = measurement_inputs(q)
    files = {"firmware": (inputs.firmware, _digest(inputs.firmware))}
    if inputs.kernel is not None and inputs.initrd is not None:
        files["kernel"] = (inputs.kernel, _digest(inputs.kernel))
        files["initrd"] = (inputs.initrd, _digest(inputs.initrd))
    return Launch(
        mode,
        version,
        inputs,
        policy=q.SEV_SNP_POLICY,
        id_block=bool(q.SEV_SNP_ID_BLOCK_FILE),
        author_key=bool(q.SEV_SNP_ID_BLOCK_FILE and q.SEV_SNP_AUTHOR_KEY_ENABLED),
        files=files,
    )


def launch_from_record(record: dict[str, Any], computation_id: str) -> Launch:
    """The Launch a VM record holds; FAILED_PRECONDITION if it is not one this daemon wrote
    (the record's other fields are checked on load, this one only where it is used)."""
    try:
        if record.get("version") != LAUNCH_VERSION:
            raise ValueError(f"version {record.get('version')!r}")
        files: dict[str, tuple[str, str | None]] = {}
        for name, (path, digest) in record["files"].items():
            if name not in ("firmware", "kernel", "initrd") or not isinstance(path, str):
                raise ValueError(f"files: {name!r}")
            if digest is not None and not isinstance(digest, str):
                raise ValueError(f"files: {name!r} digest")
            files[name] = (path, digest)
        inputs = None
        if "inputs" in record:
            inputs = MeasurementInputs(**record["inputs"])
            _check_inputs(inputs)
        policy, id_block, author_key = (
            record.get("policy", 0),
            record.get("id_block", False),
            record.get("author_key", False),
        )
        if type(policy) is not int or type(id_block) is not bool or type(author_key) is not bool:
            raise ValueError("policy")
        version = record["qemu_version"]
        if not isinstance(version, str):
            raise ValueError("qemu_version")
        return Launch(
            LaunchMode(record["mode"]), version, inputs, policy, id_block, author_key, files
        )
    except (KeyError, TypeError, ValueError) as error:
        raise FailedPreconditionError(
            f"computation {computation_id!r}: its VM record's launch inputs are not readable "
            f"({error}): what it was launched with is not known"
        ) from None


def _check_inputs(inputs: MeasurementInputs) -> None:
    for name in ("kernel", "initrd", "append"):
        value = getattr(inputs, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"inputs: {name}")
    if not isinstance(inputs.firmware, str) or not isinstance(inputs.vcpu_type, str):
        raise ValueError("inputs: firmware or vcpu_type")
    if type(inputs.vcpus) is not int or type(inputs.guest_features) is not int:
        raise ValueError("inputs: vcpus or guest_features")
