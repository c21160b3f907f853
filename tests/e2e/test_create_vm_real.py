"""End to end, today's Cocos: a client built from upstream's manager.proto alone (grpcurl
-proto tests/support/upstream_proto/manager.proto) drives the real daemon, real QEMU (TCG) and
the real test guest in its 9p flavour (build/guest/9p: Debian's generic kernel, which has
9p; the Run beside it boots the same image: one /init for both flavours).

CreateVm -> the guest mounts its two 9p shares and serves what it was handed: its
AGENT_CVM_ID, its certificate, the kernel parameter of aa_kbs_params (a second guest, handed
no certificate, sees an environment that names none) -> CVMInfo of that VM ->
AttestationPolicy (no SEV-SNP under TCG: refused naming why, an unknown id NOT_FOUND) ->
RemoveVm -> no QEMU, no share, no per-VM file, no record. Run/Stop on the same daemon still
work, and neither the key bytes nor the AWS secret appear in the daemon's log, its records,
Events or Logs.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import BOOT_TIMEOUT, guest_images, start_daemon, stop_daemon
from tests.support.harness import run_request
from tests.support.upstream_client import b64, upstream_call
from tests.test_create_vm import AWS_SECRET, CA, CERT, KEY, full_request, sections

pytestmark = pytest.mark.timeout(400)
KEY_MARKER = b"key-bytes-never-logged-4f1c"


def read_agent_port(port: int, deadline: float) -> str:
    """What the guest serves on its agent port, once it serves it (before that QEMU's
    forward accepts and closes at once)."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
            text = b"".join(chunks).decode()
            if "== /proc/cmdline" in text and text.endswith("\n"):
                return text
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest did not serve on port {port} in time")
        time.sleep(0.5)


async def test_upstream_client_drives_a_real_guest(tmp_path: Path) -> None:
    root = tmp_path / "daemon"
    kernel, rootfs = guest_images("9p")  # Debian's generic kernel: it has 9p
    daemon = await asyncio.to_thread(
        start_daemon,
        root,
        MANAGER_QEMU_DISK_IMG_KERNEL_FILE=str(kernel),
        MANAGER_QEMU_DISK_IMG_ROOTFS_FILE=str(rootfs),
        MANAGER_LOG_LEVEL="debug",
        MANAGER_QEMU_OVMF_VERSION="edk2-stable202302",
        MANAGER_EOS_VERSION="eos-e2e",
    )
    events: list[pb.ClientStreamMessage] = []
    try:
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            watch = stub.Events(pb.EventsRequest())

            async def collect() -> None:
                async for message in watch:
                    events.append(message)

            collector = asyncio.ensure_future(collect())
            await asyncio.wait_for(watch.initial_metadata(), 10)

            created = await upstream_call(daemon.address, "CreateVm", full_request())
            # A second guest, at the same time, handed no certificate at all.
            bare = await upstream_call(daemon.address, "CreateVm", {"agent_cvm_server_url": "c"})
            cvm_id = created.json["cvmId"]
            port = int(created.json["forwardedPort"])
            assert uuid.UUID(cvm_id).version == 4
            vm = daemon.vm(port)
            assert any("mount_tag=env_share" in arg for arg in vm.argv)
            assert not any("vhost-vsock" in arg for arg in vm.argv)

            served = await asyncio.to_thread(read_agent_port, port, time.monotonic() + BOOT_TIMEOUT)
            handed = sections(served)
            environment = handed["/etc/cocos/environment"]
            assert f"AGENT_CVM_ID={cvm_id}\n" in environment
            assert "AGENT_CVM_GRPC_CLIENT_KEY=/etc/certs/key.pem\n" in environment
            assert f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n" in environment
            assert handed["/etc/certs/cert.pem"] == CERT.decode()
            assert " agent.aa_kbc_params=type=sample" in handed["/proc/cmdline"]

            bare_served = await asyncio.to_thread(
                read_agent_port, int(bare.json["forwardedPort"]), time.monotonic() + BOOT_TIMEOUT
            )
            bare_environment = sections(bare_served)["/etc/cocos/environment"]
            assert f"AGENT_CVM_ID={bare.json['cvmId']}\n" in bare_environment
            assert "/etc/certs" not in bare_environment and "AWS_" not in bare_environment
            assert "== /etc/certs/cert.pem" not in bare_served
            removed = await upstream_call(
                daemon.address, "RemoveVm", {"cvm_id": bare.json["cvmId"]}
            )
            assert removed.code == 0, removed.err

            info = (await upstream_call(daemon.address, "CVMInfo", {"id": cvm_id})).json
            assert info["id"] == cvm_id and info["cpuNum"] == 1 and info["cpuType"] == "max"
            assert info["ovmfVersion"] == "edk2-stable202302"
            assert info["eosVersion"] == "eos-e2e"
            assert info["kernelCmd"].endswith(" agent.aa_kbc_params=type=sample")
            # OVMF adds its own initrd=... after the line QEMU was given.
            assert handed["/proc/cmdline"].startswith(info["kernelCmd"] + " ")

            policy = await upstream_call(daemon.address, "AttestationPolicy", {"id": cvm_id})
            assert "FailedPrecondition" in policy.err and "not an SEV-SNP or TDX" in policy.err
            unknown = await upstream_call(daemon.address, "AttestationPolicy", {"id": "nope"})
            assert "NotFound" in unknown.err

            logs = [
                line.message
                async for line in stub.Logs(pb.LogsRequest(computation_id=cvm_id), timeout=10)
            ]
            assert any(line.endswith(f"BOOTED {cvm_id}") for line in logs)

            # Run/Stop on the same daemon, beside it.
            response = await stub.Run(run_request("e2e-classic"), timeout=BOOT_TIMEOUT)
            assert int(response.agent_port) != port
            await stub.Stop(pb.StopRequest(computation_id="e2e-classic"), timeout=60)

            removed = await upstream_call(daemon.address, "RemoveVm", {"cvm_id": cvm_id})
            assert removed.code == 0, removed.err
            assert not vm.process.is_running() or vm.process.status() == "zombie"
            assert daemon.vm_files() == []
            assert list((root / "state").glob("vm-*")) == []
            assert (await stub.List(pb.ListRequest(), timeout=5)).computations == []
            collector.cancel()
    finally:
        await asyncio.to_thread(stop_daemon, daemon)

    secrets = (KEY_MARKER, AWS_SECRET.encode(), b64(KEY).encode(), CA.split(b"\n")[1])
    for path in [*root.glob("daemon-*.log"), *(root / "state").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), path
    streamed = b"".join(m.SerializeToString() for m in events)
    assert streamed and not any(secret in streamed for secret in secrets)
