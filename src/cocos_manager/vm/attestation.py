"""The expected launch measurement of an SEV-SNP VM and the document a verifier checks with.

An SNP attestation report carries MEASUREMENT: a SHA-384 chain over every page the firmware,
the kernel-hashes table and the initial vCPU states (VMSAs) put into the guest at launch. It
is computed here before (or while) the VM runs, from the VM's actual firmware, kernel, initrd,
command line, vCPU count and type and guest features, by virtee's `sev-snp-measure` library:
the same code verifiers use, not a re-implementation that could drift from it.

A running VM is described as it was launched (launch.py: the values and file digests kept in
its VM record), never as the settings or the files on disk would launch one now: a file that
changed since is refused with FAILED_PRECONDITION naming it, not measured.

The document also carries what the report must show besides the measurement (policy,
host-data) and which QEMU launched the VM, in the field names of go-sev-guest's `check`
policy where one exists, so a verifier can feed it to that tool.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sevsnpmeasure import guest as snp_guest
from sevsnpmeasure import vcpu_types
from sevsnpmeasure.sev_mode import SevMode

from cocos_manager.confidential import LaunchMode, launched_binding
from cocos_manager.config import QemuSettings
from cocos_manager.errors import FailedPreconditionError
from cocos_manager.vm.launch import (
    Launch,
    MeasurementInputs,
    launch_from_record,
    launch_of,
    sha256_file,
)

# Re-exported: the measurement's inputs are part of this module's face (tests, check).
from cocos_manager.vm.launch import measurement_inputs as measurement_inputs

DOCUMENT_VERSION = 1


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
    """The document for a VM launched now with the settings `q` (derive_vm_settings)."""
    return launched_document(
        launch_of(q, qemu_version), computation_id=computation_id, binding=binding
    )


def check_unchanged(launch: Launch, computation_id: str) -> None:
    """Every file the document measures or reports is still the one the VM was launched with
    (its SHA-256 then); else FAILED_PRECONDITION naming the file and what changed."""
    for name, (path, launched) in launch.files.items():
        if launched is None:
            raise FailedPreconditionError(
                f"computation {computation_id!r}: its {name} {path!r} could not be read at "
                f"launch, so what it was launched with is not known"
            )
        try:
            now = sha256_file(path)
        except OSError as error:
            raise FailedPreconditionError(
                f"computation {computation_id!r}: the {name} it was launched with, {path!r}, "
                f"cannot be read any more ({error.strerror}): its measurement as launched "
                f"cannot be computed"
            ) from None
        if now != launched:
            raise FailedPreconditionError(
                f"computation {computation_id!r}: the {name} {path!r} changed since the VM "
                f"was launched (SHA-256 {launched} then, {now} now): its measurement as "
                f"launched cannot be computed from it"
            )


def launched_document(
    launch: Launch, *, computation_id: str, binding: dict[str, str]
) -> dict[str, Any]:
    """What a verifier needs to check the attestation report of the VM `launch` describes.
    `binding` is what its QEMU got as host-data / mrconfigid (launched_binding of its argv).
    Blocking (hashes the files to compare them with the launch)."""
    document: dict[str, Any] = {
        "version": DOCUMENT_VERSION,
        "computation_id": computation_id,
        "qemu_version": launch.qemu_version,
    }
    if launch.mode is LaunchMode.TDX:
        check_unchanged(launch, computation_id)
        firmware, digest = launch.files["firmware"]
        document["technology"] = "tdx"
        document["tdx"] = {
            "mrconfigid": binding.get("mrconfigid"),
            "mrconfigid_hex": _hex(binding.get("mrconfigid")),
            "firmware": firmware,
            "firmware_sha256": digest,
            "mrtd": None,  # not computed here: sev-snp-measure covers SEV-SNP only
        }
        return document
    inputs = launch.inputs
    if launch.mode not in (LaunchMode.SNP_SEED, LaunchMode.SNP_UPSTREAM) or inputs is None:
        raise FailedPreconditionError(
            f"computation {computation_id!r} is not an SEV-SNP or TDX launch "
            f"(MANAGER_QEMU_ENABLE_SEV_SNP / MANAGER_QEMU_ENABLE_TDX were off)"
        )
    check_unchanged(launch, computation_id)
    measurement = expected_measurement(inputs)
    host = binding.get("host_data")
    document["technology"] = "sev-snp"
    document["policy"] = {
        # go-sev-guest `check` policy fields (bytes as base64, as protobuf JSON writes them)
        "measurement": base64.b64encode(measurement).decode(),
        "policy": launch.policy,
        "host_data": host,
        "require_id_block": launch.id_block,
        "require_author_key": launch.author_key,
    }
    files = {f"{name}_sha256": digest for name, (_, digest) in launch.files.items()}
    document["sev_snp"] = {
        "measurement_hex": measurement.hex(),
        "policy_hex": f"{launch.policy:#x}",
        "host_data_hex": _hex(host),
        "syntax": "upstream" if launch.mode is LaunchMode.SNP_UPSTREAM else "seed",
        "inputs": asdict(inputs),
        **files,
        "sev_snp_measure_version": library_version(),
        "sev_snp_measure_command": sev_snp_measure_command(inputs),
    }
    return document


def _hex(value: str | None) -> str | None:
    return None if value is None else base64.b64decode(value).hex()


def computation_policy_json(
    launch: dict[str, Any] | None, argv: Sequence[str], computation_id: str
) -> bytes:
    """The AttestationPolicy answer for a running VM: what it was launched with (`launch`, the
    record form kept in its VM record) and what its QEMU got on its command line. Blocking
    (hashes the firmware, kernel and initrd): run it in a worker thread."""
    if launch is None:
        raise FailedPreconditionError(
            f"computation {computation_id!r} was started by an earlier version of the daemon, "
            f"which did not record what it was launched with: its expected measurement is not "
            f"known (stop it and run it again)"
        )
    document = launched_document(
        launch_from_record(launch, computation_id),
        computation_id=computation_id,
        binding=launched_binding(argv),
    )
    return json.dumps(document, indent=2).encode() + b"\n"
