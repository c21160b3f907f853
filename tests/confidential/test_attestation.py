"""The expected SEV-SNP launch measurement and the AttestationPolicy document.

The measurement is checked against values virtee/sev-snp-measure publishes in its own tests
for its fixture firmware (tests/fixtures/sev-snp-measure/README.md), going through the
manager's settings, so a wrong mapping (vCPU count or type, guest features, kernel hashes on
or off, the command line) shows as a wrong digest. The document is checked end to end: a Run
on the stand-in QEMU, the AttestationPolicy RPC on a real gRPC server, the CLI, and the
measurement recomputed by the `sev-snp-measure` command the document names.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.confidential.argv import host_data
from cocos_manager.confidential.modes import launched_binding
from cocos_manager.config.settings import QemuSettings
from cocos_manager.errors import FailedPreconditionError
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu.argv import qemu_args
from cocos_manager.vm.attestation import (
    attestation_policy_document,
    expected_measurement,
    measurement_inputs,
)
from tests.support.harness import run_request, running_manager

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sev-snp-measure"
OVMF_AMDSEV = str(FIXTURES / "ovmf_AmdSev_suffix.bin")
SEV_SNP_MEASURE = str(Path(sys.executable).with_name("sev-snp-measure"))


def settings(**env: object) -> QemuSettings:
    return QemuSettings(**env)  # type: ignore[arg-type]


def published(**env: object) -> QemuSettings:
    """The inputs of sev-snp-measure's published vectors, said as manager settings."""
    fixed: dict[str, object] = {"SEV_SNP_SYNTAX": "upstream", "BIOS_FILE": OVMF_AMDSEV}
    return settings(**{**fixed, "SMP_COUNT": 1, "CPU": "EPYC-v4", **env})


KERNEL = {
    "KERNEL_HASH": True,
    "DISK_IMG_KERNEL_FILE": os.devnull,
    "DISK_IMG_ROOTFS_FILE": os.devnull,
    "KERNEL_CMDLINE": "console=ttyS0 loglevel=7",
}


@pytest.mark.parametrize(
    ("env", "digest"),
    [
        # test_snp_ovmf_hash_full_default
        (
            {**KERNEL, "SEV_SNP_GUEST_FEATURES": 0x21},
            "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977",
        ),
        # test_snp_ovmf_hash_full_feature_snp_only
        (
            {**KERNEL, "SEV_SNP_GUEST_FEATURES": 0x1},
            "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa",
        ),
        # test_snp_without_kernel_feature_snp_only: kernel hashes off, the manager's defaults
        (
            {"KERNEL_CMDLINE": "ignored without kernel hashes"},
            "19358ba9a7615534a9a1e2f0dfc29384dcd4dcb7062ff9c6013b26869a5fc6ecabe033c48dd6f6db5d6d76e7c5df632d",
        ),
    ],
)
def test_published_vectors(env: dict[str, object], digest: str) -> None:
    assert expected_measurement(measurement_inputs(published(**env))).hex() == digest


def test_inputs_follow_the_settings() -> None:
    q = settings(
        SEV_SNP_SYNTAX="upstream",
        BIOS_FILE="/fw/amdsev.fd",
        SMP_COUNT=3,
        CPU="EPYC-Milan",
        KERNEL_HASH=True,
        DISK_IMG_KERNEL_FILE="/k",
        DISK_IMG_ROOTFS_FILE="/r",
    )
    inputs = measurement_inputs(q)
    assert (inputs.firmware, inputs.kernel, inputs.initrd) == ("/fw/amdsev.fd", "/k", "/r")
    assert inputs.append == '"earlyprintk=serial console=ttyS0"'  # the -append element as is
    assert (inputs.vcpus, inputs.vcpu_type, inputs.guest_features) == (3, "EPYC-Milan", 1)
    seed = measurement_inputs(settings(OVMF_CODE_FILE="/code.fd"))
    assert seed.firmware == "/code.fd" and seed.kernel is None  # the seed's pflash firmware


def test_cpu_without_a_signature_names_the_setting() -> None:
    with pytest.raises(FailedPreconditionError, match="MANAGER_QEMU_CPU: 'host'"):
        expected_measurement(measurement_inputs(published(CPU="host")))


def test_firmware_without_kernel_hashes_table_is_a_clear_error() -> None:
    """Debian's OVMF.fd is the plain OvmfPkgX64 build: no table for kernel hashes."""
    q = settings(SEV_SNP_SYNTAX="upstream", KERNEL_HASH=True, **{
        k: v for k, v in KERNEL.items() if k != "KERNEL_HASH"
    })  # fmt: skip
    with pytest.raises(FailedPreconditionError, match="SNP_KERNEL_HASHES"):
        expected_measurement(measurement_inputs(q))


def test_document_and_the_command_that_recomputes_it(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "bzImage", tmp_path / "rootfs.cpio.gz"
    kernel.write_bytes(os.urandom(5000))
    initrd.write_bytes(os.urandom(3000))
    q = published(
        KERNEL_HASH=True,
        DISK_IMG_KERNEL_FILE=str(kernel),
        DISK_IMG_ROOTFS_FILE=str(initrd),
        SEV_SNP_POLICY="0x30000",
    )
    manifest = b'{"id":"c1"}'
    binding = launched_binding(
        qemu_args(q.model_copy(update={"BIND_MANIFEST": True}), manifest=manifest)
    )
    doc = attestation_policy_document(
        q, computation_id="c1", binding=binding, qemu_version="QEMU emulator version 10.0.2"
    )
    snp = doc["sev_snp"]
    assert doc["technology"] == "sev-snp" and doc["computation_id"] == "c1"
    assert doc["policy"]["policy"] == 0x30000 and snp["policy_hex"] == "0x30000"
    assert doc["policy"]["host_data"] == host_data(manifest)
    assert snp["host_data_hex"] == hashlib.sha256(manifest).hexdigest()
    assert base64.b64decode(doc["policy"]["measurement"]).hex() == snp["measurement_hex"]
    assert snp["kernel_sha256"] == hashlib.sha256(kernel.read_bytes()).hexdigest()
    assert snp["firmware_sha256"] == hashlib.sha256(Path(OVMF_AMDSEV).read_bytes()).hexdigest()
    # The library's own command line, as the document gives it, says the same.
    command = [SEV_SNP_MEASURE, *snp["sev_snp_measure_command"][1:]]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == snp["measurement_hex"]
    assert json.loads(json.dumps(doc)) == doc


def test_not_confidential_is_refused() -> None:
    with pytest.raises(FailedPreconditionError, match="not an SEV-SNP or TDX launch"):
        attestation_policy_document(
            settings(ENABLE_SEV_SNP=False), computation_id="c", binding={}, qemu_version=""
        )


def snp_env(tmp: Path) -> dict[str, str]:
    return {
        "MANAGER_QEMU_ENABLE_SEV_SNP": "true",
        "MANAGER_QEMU_SEV_SNP_SYNTAX": "upstream",
        "MANAGER_QEMU_BIND_MANIFEST": "true",
        "MANAGER_QEMU_BIOS_FILE": OVMF_AMDSEV,
        "MANAGER_QEMU_KERNEL_HASH": "true",
        "MANAGER_QEMU_CPU": "EPYC-v4",
        "MANAGER_QEMU_SMP_COUNT": "2",
    }


async def test_attestation_policy_rpc_and_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, **snp_env(tmp_path)) as manager:
        await manager.stub.Run(run_request("c1"), timeout=30)
        answer = await manager.stub.AttestationPolicy(
            pb.AttestationPolicyRequest(computation_id="c1"), timeout=30
        )
        assert answer.computation_id == "c1"
        doc = json.loads(answer.info)
        inputs = doc["sev_snp"]["inputs"]
        assert (inputs["vcpus"], inputs["vcpu_type"], inputs["firmware"]) == (
            2,
            "EPYC-v4",
            OVMF_AMDSEV,
        )
        # The VM's own kernel and initrd (its per-VM links), with the same content as the images.
        images = manager.settings.qemu
        assert doc["sev_snp"]["kernel_sha256"] == (
            hashlib.sha256(
                await asyncio.to_thread(Path(images.DISK_IMG_KERNEL_FILE).read_bytes)
            ).hexdigest()
        )
        assert inputs["kernel"] != images.DISK_IMG_KERNEL_FILE
        assert doc["qemu_version"] == "QEMU emulator version 10.0.2 (fake)"
        recomputed = await asyncio.to_thread(
            subprocess.run,
            [SEV_SNP_MEASURE, *doc["sev_snp"]["sev_snp_measure_command"][1:]],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert recomputed.stdout.strip() == doc["sev_snp"]["measurement_hex"]

        # In a thread: the server answering it runs on this test's event loop.
        cli = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "cocos_manager.cli.commands",
                "attestation-policy",
                "c1",
                "--address",
                manager.address,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert cli.returncode == 0, cli.stderr
        assert (
            json.loads(cli.stdout)["sev_snp"]["measurement_hex"]
            == (doc["sev_snp"]["measurement_hex"])
        )

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await manager.stub.AttestationPolicy(
                pb.AttestationPolicyRequest(computation_id="nope"), timeout=30
            )
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert "'nope'" in (caught.value.details() or "")


async def test_run_binds_the_manifest_into_host_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, **snp_env(tmp_path)) as manager:
        request = run_request("c2")
        expected = host_data(manifest_json(request))
        subscription = manager.service.subscribe("c2")
        try:
            await manager.stub.Run(request, timeout=30)
            async for message in subscription:
                event = message.agent_event
                if (event.event_type, event.status) == ("vm-provision", "complete"):
                    break
        finally:
            subscription.close()
        assert json.loads(event.details)["host_data"] == expected
        answer = await manager.stub.AttestationPolicy(
            pb.AttestationPolicyRequest(computation_id="c2"), timeout=30
        )
        assert json.loads(answer.info)["policy"]["host_data"] == expected
