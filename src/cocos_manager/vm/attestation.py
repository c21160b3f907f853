"""The expected launch measurement of an SEV-SNP VM and the document a verifier checks with.

An SNP attestation report carries MEASUREMENT: a SHA-384 chain over every page the firmware,
the kernel-hashes table and the initial vCPU states (VMSAs) put into the guest at launch. It
is computed here before (or while) the VM runs, from the VM's actual firmware, kernel, initrd,
command line, vCPU count and type and guest features, by virtee's `sev-snp-measure` library:
the same code verifiers use, not a re-implementation that could drift from it.

The document also carries what the report must show besides the measurement (policy,
host-data) and which QEMU launched the VM, in the field names of go-sev-guest's `check`
policy where one exists, so a verifier can feed it to that tool.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sevsnpmeasure import guest as snp_guest
from sevsnpmeasure import vcpu_types
from sevsnpmeasure.sev_mode import SevMode

from cocos_manager.confidential.modes import (
    LaunchMode,
    firmware_file,
    launch_mode,
    launched_binding,
    qemu_binary,
    qemu_version,
)
from cocos_manager.config.settings import QemuSettings
from cocos_manager.errors import FailedPreconditionError
from cocos_manager.qemu.argv import VmResources, VmSize, derive_vm_settings

DOCUMENT_VERSION = 1


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


def expected_measurement(inputs: MeasurementInputs) -> bytes:
    """The 48-byte SNP launch digest (MEASUREMENT) for these inputs."""
    signature = vcpu_types.CPU_SIGS.get(inputs.vcpu_type)
    if signature is None:
        raise FailedPreconditionError(
            f"MANAGER_QEMU_CPU: {inputs.vcpu_type!r} has no known CPUID signature, so the "
            f"launch measurement cannot be computed (use one of "
            f"{', '.join(sorted(vcpu_types.CPU_SIGS))})"
        )
    for name, path in (
        ("firmware", inputs.firmware),
        ("kernel", inputs.kernel),
        ("initrd", inputs.initrd),
    ):
        if path is not None and not Path(path).exists():
            raise FailedPreconditionError(f"measurement: the {name} {path!r} does not exist")
    try:
        digest = snp_guest.calc_launch_digest(
            SevMode.SEV_SNP,
            inputs.vcpus,
            signature,
            inputs.firmware,
            inputs.kernel,
            inputs.initrd,
            inputs.append,
            inputs.guest_features,
        )
    except (RuntimeError, ValueError) as error:
        raise FailedPreconditionError(
            f"measurement: {error} (firmware {inputs.firmware!r})"
        ) from None
    assert isinstance(digest, bytes)
    return digest


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sev_snp_measure_command(inputs: MeasurementInputs) -> list[str]:
    """The `sev-snp-measure` command line that recomputes the measurement."""
    argv = [
        "sev-snp-measure",
        "--mode",
        "snp",
        f"--vcpus={inputs.vcpus}",
        f"--vcpu-type={inputs.vcpu_type}",
        f"--ovmf={inputs.firmware}",
        f"--guest-features={inputs.guest_features:#x}",
    ]
    if inputs.kernel is not None:
        argv.append(f"--kernel={inputs.kernel}")
    if inputs.initrd is not None:
        argv.append(f"--initrd={inputs.initrd}")
    if inputs.append is not None:
        argv.append(f"--append={inputs.append}")
    return argv


def library_version() -> str:
    return importlib.metadata.version("sev-snp-measure")


def attestation_policy_document(
    q: QemuSettings,
    *,
    computation_id: str,
    binding: dict[str, str],
    qemu_version: str,
) -> dict[str, Any]:
    """What a verifier needs to check this VM's attestation report.

    `q` are the VM's own settings (derive_vm_settings), `binding` what its QEMU got as
    host-data / mrconfigid (confidential.launched_binding of its argv).
    """
    mode = launch_mode(q)
    document: dict[str, Any] = {
        "version": DOCUMENT_VERSION,
        "computation_id": computation_id,
        "qemu_version": qemu_version,
    }
    if mode is LaunchMode.TDX:
        document["technology"] = "tdx"
        document["tdx"] = {
            "mrconfigid": binding.get("mrconfigid"),
            "mrconfigid_hex": _hex(binding.get("mrconfigid")),
            "firmware": q.BIOS_FILE,
            "firmware_sha256": _sha256_file(q.BIOS_FILE),
            "mrtd": None,  # not computed here: sev-snp-measure covers SEV-SNP only
        }
        return document
    if mode not in (LaunchMode.SNP_SEED, LaunchMode.SNP_UPSTREAM):
        raise FailedPreconditionError(
            f"computation {computation_id!r} is not an SEV-SNP or TDX launch "
            f"(MANAGER_QEMU_ENABLE_SEV_SNP / MANAGER_QEMU_ENABLE_TDX are off)"
        )
    inputs = measurement_inputs(q)
    measurement = expected_measurement(inputs)
    host = binding.get("host_data")
    document["technology"] = "sev-snp"
    document["policy"] = {
        # go-sev-guest `check` policy fields (bytes as base64, as protobuf JSON writes them)
        "measurement": base64.b64encode(measurement).decode(),
        "policy": q.SEV_SNP_POLICY,
        "host_data": host,
        "require_id_block": bool(q.SEV_SNP_ID_BLOCK_FILE),
        "require_author_key": bool(q.SEV_SNP_ID_BLOCK_FILE and q.SEV_SNP_AUTHOR_KEY_ENABLED),
    }
    files = {"firmware_sha256": _sha256_file(inputs.firmware)}
    if inputs.kernel is not None and inputs.initrd is not None:
        files["kernel_sha256"] = _sha256_file(inputs.kernel)
        files["initrd_sha256"] = _sha256_file(inputs.initrd)
    document["sev_snp"] = {
        "measurement_hex": measurement.hex(),
        "policy_hex": f"{q.SEV_SNP_POLICY:#x}",
        "host_data_hex": _hex(host),
        "syntax": "upstream" if mode is LaunchMode.SNP_UPSTREAM else "seed",
        "inputs": asdict(inputs),
        **files,
        "sev_snp_measure_version": library_version(),
        "sev_snp_measure_command": sev_snp_measure_command(inputs),
    }
    return document


def _hex(value: str | None) -> str | None:
    return None if value is None else base64.b64decode(value).hex()


def computation_policy_json(
    q: QemuSettings,
    resources: VmResources,
    argv: Sequence[str],
    computation_id: str,
    size: VmSize | None = None,
) -> bytes:
    """The AttestationPolicy answer for a running VM: its own settings (base settings and the
    resources it was given), what its QEMU got on its command line, and which QEMU that is.
    Blocking (hashes the firmware, kernel and initrd): run it in a worker thread."""
    binary = qemu_binary(q)
    document = attestation_policy_document(
        derive_vm_settings(q, resources, size),  # its own vCPUs: measured, one VMSA each
        computation_id=computation_id,
        binding=launched_binding(argv),
        qemu_version=qemu_version(binary) if binary else "",
    )
    return json.dumps(document, indent=2).encode() + b"\n"
