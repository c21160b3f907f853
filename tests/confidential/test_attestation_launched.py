"""AttestationPolicy describes a running VM as it was launched: not as the settings of the
daemon now answering, nor as the firmware file on disk now is. What the VM was launched with
is kept in its VM record (vm/launch.py); a file that changed since is refused with
FAILED_PRECONDITION naming it, never measured into a silently different answer.

SEV-SNP cannot launch on a test host: the daemon runs with SEV-SNP settings and the
stand-in QEMU, as in test_attestation.py, and the measurement is sev-snp-measure's for the
fixture firmware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.config.settings import QemuSettings
from cocos_manager.errors import FailedPreconditionError
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm.attestation import computation_policy_json
from cocos_manager.vm.launch import launch_of
from tests.confidential.test_attestation import OVMF_AMDSEV, snp_env
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request, running_manager
from tests.support.waiting import wait_for


async def policy(stub: Any, computation_id: str = "c1") -> dict[str, Any]:
    answer = await stub.AttestationPolicy(
        pb.AttestationPolicyRequest(computation_id=computation_id), timeout=60
    )
    document: dict[str, Any] = json.loads(answer.info)
    return document


async def refused(stub: Any, computation_id: str = "c1") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await policy(stub, computation_id)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    return caught.value.details() or ""


def replace(path: Path, content: bytes) -> None:
    """As a package upgrade does: a new file renamed over the old one."""
    new = path.with_suffix(".dpkg-new")
    new.write_bytes(content)
    os.replace(new, path)


async def test_a_firmware_replaced_on_disk_is_refused_not_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    firmware = tmp_path / "firmware" / "OVMF.amdsev.fd"
    firmware.parent.mkdir()
    launched = await asyncio.to_thread(Path(OVMF_AMDSEV).read_bytes)
    await asyncio.to_thread(firmware.write_bytes, launched)
    env = snp_env(tmp_path) | {"MANAGER_QEMU_BIOS_FILE": str(firmware)}
    async with running_manager(tmp_path, monkeypatch, **env) as manager:
        await manager.stub.Run(run_request("c1"), timeout=30)
        before = await policy(manager.stub)
        assert before["sev_snp"]["inputs"]["firmware"] == str(firmware)

        upgraded = bytearray(launched)
        upgraded[0] ^= 0xFF  # another build: sev-snp-measure would measure it differently
        await asyncio.to_thread(replace, firmware, bytes(upgraded))
        details = await refused(manager.stub)
        assert f"the firmware {str(firmware)!r} changed since the VM was launched" in details
        assert before["sev_snp"]["firmware_sha256"] in details  # what it was at launch

        await asyncio.to_thread(replace, firmware, launched)  # the launched one is back
        assert await policy(manager.stub) == before


def record_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "state").glob("vm-*.json"))


async def adopted(daemon: Daemon, computation_id: str) -> None:
    async def listed() -> bool:
        answer = await daemon.stub.List(pb.ListRequest(), timeout=30)
        return any(c.computation_id == computation_id and c.adopted for c in answer.computations)

    for _ in range(400):  # bounded: recovery runs at start, before SERVING, normally
        if await listed():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{computation_id} was not re-adopted:\n{daemon.log_tail()}")


async def test_after_a_restart_with_other_settings_the_vm_is_described_as_launched(
    tmp_path: Path,
) -> None:
    launched_with = (
        base_env(tmp_path)
        | snp_env(tmp_path)
        | {
            "MANAGER_SHUTDOWN_STOPS_VMS": "false",  # SIGTERM leaves the VM for the next start
            "MANAGER_QEMU_SMP_COUNT": "4",
            "MANAGER_QEMU_CPU": "EPYC-v4",
            "MANAGER_QEMU_KERNEL_CMDLINE": "console=ttyS0 launched",
            "MANAGER_QEMU_SEV_SNP_POLICY": "0x30000",
            "MANAGER_QEMU_SEV_SNP_GUEST_FEATURES": "0x1",
        }
    )
    restarted_with = launched_with | {
        "MANAGER_QEMU_SMP_COUNT": "2",
        "MANAGER_QEMU_CPU": "EPYC-Milan",
        "MANAGER_QEMU_KERNEL_CMDLINE": "console=ttyS0 changed",
        "MANAGER_QEMU_SEV_SNP_POLICY": "0x30001",
        "MANAGER_QEMU_SEV_SNP_GUEST_FEATURES": "0x21",
    }
    daemon = Daemon(env=launched_with, log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("c1"), timeout=30)
        await daemon.stub.Run(run_request("c2"), timeout=30)
        before = await policy(daemon.stub)
        inputs = before["sev_snp"]["inputs"]
        assert (inputs["vcpus"], inputs["vcpu_type"], before["policy"]["policy"]) == (
            4,
            "EPYC-v4",
            0x30000,
        )
        assert inputs["append"] == "console=ttyS0 launched"
        assert await daemon.terminate() == 0
        # c2's record as a daemon that did not keep the launch wrote it (the format before).
        for path in record_files(tmp_path):
            record = json.loads(path.read_text())
            if record["computation_id"] == "c2":
                record.pop("launch", None)
                path.write_text(json.dumps(record))

        daemon = Daemon(env=restarted_with, log=tmp_path / "daemon.log")
        await daemon.start()
        await adopted(daemon, "c1")
        assert await policy(daemon.stub) == before  # every field as launched
        # The record without it is still adopted, and the answer is a refusal saying why,
        # not one made of today's settings.
        await adopted(daemon, "c2")
        assert "did not record what it was launched with" in await refused(daemon.stub, "c2")
        for computation_id in ("c1", "c2"):
            await daemon.stub.Stop(pb.StopRequest(computation_id=computation_id), timeout=30)
        await wait_for(lambda: not record_files(tmp_path), "the VM records to be removed")
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            for computation_id in ("c1", "c2"):  # it leaves VMs running when it ends
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await daemon.stub.Stop(pb.StopRequest(computation_id=computation_id))
            await daemon.terminate()


def test_a_tdx_firmware_replaced_since_the_launch_is_refused(tmp_path: Path) -> None:
    firmware = tmp_path / "OVMF.tdx.fd"
    firmware.write_bytes(b"launched firmware")
    q = QemuSettings(ENABLE_TDX=True, ENABLE_SEV_SNP=False, BIOS_FILE=str(firmware))  # type: ignore[call-arg]
    launch = launch_of(q, "QEMU emulator version 10.1.0").to_record()
    document = json.loads(computation_policy_json(launch, [], "t1"))
    assert document["tdx"]["firmware_sha256"] == launch["files"]["firmware"][1]
    replace(firmware, b"upgraded firmware")
    with pytest.raises(FailedPreconditionError, match=r"the firmware .* changed since the VM"):
        computation_policy_json(launch, [], "t1")


@pytest.mark.parametrize(
    "launch",
    [
        {"version": 2, "mode": "sev-snp", "qemu_version": "", "files": {}},
        {"version": 1, "mode": "sev-snp", "qemu_version": "", "files": {"bios": ["/x", None]}},
        {"version": 1, "mode": "warp", "qemu_version": "", "files": {}},
        {"version": 1, "mode": "sev-snp", "qemu_version": "", "files": {}, "inputs": {"vcpus": 2}},
        {"version": 1, "mode": "tdx", "qemu_version": 7, "files": {}},
    ],
)
def test_launch_inputs_the_daemon_did_not_write_are_refused(launch: dict[str, Any]) -> None:
    with pytest.raises(FailedPreconditionError, match="launch inputs are not readable"):
        computation_policy_json(launch, [], "c1")
