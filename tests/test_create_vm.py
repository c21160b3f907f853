"""Today's upstream control plane (CreateVm, RemoveVm, CVMInfo, AttestationPolicy) driven by a
client built from upstream's proto alone (grpcurl -proto, tests/support/upstream_proto), on
the real daemon with the stand-in QEMU, which serves what the test guest would (the 9p shares'
environment file, cert.pem and the kernel command line). The real guest: tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import stat
import uuid
from pathlib import Path

import grpc
import pytest

from cocos_manager.confidential.argv import host_data
from cocos_manager.proto import manager_pb2 as pb
from tests.confidential.test_attestation import SEV_SNP_MEASURE, snp_env
from tests.support.harness import Manager, run_request, running_manager
from tests.support.records import newest_record_path, newest_record_paths
from tests.support.upstream_client import b64, upstream_call
from tests.support.waiting import wait_for

CERT = b"-----BEGIN CERTIFICATE-----\ncert-of-the-agent\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nkey-bytes-never-logged-4f1c\n-----END PRIVATE KEY-----\n"
CA = b"-----BEGIN CERTIFICATE-----\nca-of-the-cvm-server\n-----END CERTIFICATE-----\n"
AWS_SECRET = "aws-secret-never-logged-9b7e"


def full_request(**extra: str) -> dict[str, str]:
    return {
        "agent_log_level": "debug",
        "agent_cvm_server_ca_cert": b64(CA),
        "agent_cvm_client_key": b64(KEY),
        "agent_cvm_client_cert": b64(CERT),
        "agent_cvm_server_url": "cvms.example:7001",
        "agent_cvm_ca_url": "https://ca.example",
        "agent_certs_token": "token-1",
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": AWS_SECRET,
        "aws_endpoint_url": "http://minio.example:9000",
        "aws_region": "eu-west-1",
        "aa_kbs_params": "type=sample",
        **extra,
    }


def fetch_agent_port(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def sections(document: str) -> dict[str, str]:
    """The test guest's document: "== NAME" lines, each followed by that file's text."""
    out: dict[str, str] = {}
    name = ""
    for line in document.splitlines(keepends=True):
        if line.startswith("== "):
            name = line[3:].strip()
            out[name] = ""
        else:
            out[name] += line
    return out


def leftovers(manager: Manager) -> list[str]:
    vms = manager.tmp / "vms"
    state = manager.tmp / "state"
    found = sorted(os.listdir(vms)) if vms.exists() else []
    return found + sorted(p.name for p in state.glob("vm-*"))


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    async with running_manager(
        tmp_path,
        monkeypatch,
        MANAGER_QEMU_OVMF_VERSION="edk2-stable202408",
        MANAGER_EOS_VERSION="eos-0.9.1",
        MANAGER_QEMU_KERNEL_CMDLINE="console=ttyS0 quiet",
        MANAGER_QEMU_SMP_COUNT="3",
        MANAGER_QEMU_CPU="EPYC-v4",
    ) as m:
        yield m


async def test_create_hands_the_agent_its_settings_and_remove_leaves_nothing(
    manager: Manager,
) -> None:
    created = (await upstream_call(manager.address, "CreateVm", full_request())).json
    cvm_id = created["cvmId"]
    assert uuid.UUID(cvm_id).version == 4 and str(uuid.UUID(cvm_id)) == cvm_id
    port = int(created["forwardedPort"])
    assert created["forwardedPort"] == str(port)

    handed = sections(await asyncio.to_thread(fetch_agent_port, port))
    assert handed["/etc/cocos/environment"] == (
        "AGENT_LOG_LEVEL=debug\n"
        "AGENT_CVM_GRPC_URL=cvms.example:7001\n"
        f"AGENT_CVM_ID={cvm_id}\n"
        "AGENT_CERTS_TOKEN=token-1\n"
        "AGENT_CVM_CA_URL=https://ca.example\n"
        "AGENT_CVM_GRPC_CLIENT_CERT=/etc/certs/cert.pem\n"
        "AGENT_CVM_GRPC_CLIENT_KEY=/etc/certs/key.pem\n"
        "AGENT_CVM_GRPC_SERVER_CA_CERTS=/etc/certs/ca.pem\n"
        "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\n"
        f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n"
        "AWS_ENDPOINT_URL=http://minio.example:9000\n"
        "AWS_REGION=eu-west-1\n"
    )
    assert handed["/etc/certs/cert.pem"] == CERT.decode()
    assert handed["/proc/cmdline"] == "console=ttyS0 quiet agent.aa_kbc_params=type=sample\n"

    # The shares: the daemon's user only, in a directory of the VM's own.
    (shares,) = (manager.tmp / "vms").glob("shares-*")
    assert stat.S_IMODE(shares.stat().st_mode) == 0o700
    for path in shares.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    assert (shares / "certs" / "key.pem").read_bytes() == KEY
    assert (shares / "certs" / "ca.pem").read_bytes() == CA

    # A computation like any other; nothing of the shares in List or in the record (but for
    # QEMU's command line, which names the shares' directories as /proc shows it anyway).
    listed = await manager.stub.List(pb.ListRequest())
    assert [c.computation_id for c in listed.computations] == [cvm_id]
    assert listed.computations[0].agent_port == str(port)
    record = newest_record_path(manager.tmp / "state")
    text = record.read_text()
    assert "key-bytes" not in text and AWS_SECRET not in text and "token-1" not in text
    files = json.loads(text)["files"]
    assert not any("shares-" in path for path in files.values())
    assert "shares-" not in str(listed)
    argv = json.loads(text)["argv"]
    assert "-fw_cfg" not in argv and not any("vhost-vsock" in a for a in argv)
    assert f"local,id=env_fs,path={shares}/env,security_model=mapped,readonly=on" in argv

    info = (await upstream_call(manager.address, "CVMInfo", {"id": cvm_id})).json
    assert info == {
        "id": cvm_id,
        "ovmfVersion": "edk2-stable202408",
        "cpuNum": 3,
        "cpuType": "EPYC-v4",
        "kernelCmd": "console=ttyS0 quiet agent.aa_kbc_params=type=sample",
        "eosVersion": "eos-0.9.1",
    }

    removed = await upstream_call(manager.address, "RemoveVm", {"cvm_id": cvm_id})
    assert removed.code == 0, removed.err
    assert removed.json == {}
    assert manager.service.computations() == {}
    assert leftovers(manager) == []
    again = await upstream_call(manager.address, "RemoveVm", {"cvm_id": cvm_id})
    assert again.code != 0 and "NotFound" in again.err and cvm_id in again.err


async def test_without_certificates_the_environment_names_none(manager: Manager) -> None:
    created = (
        await upstream_call(manager.address, "CreateVm", {"agent_cvm_server_url": "cvms:7001"})
    ).json
    handed = sections(await asyncio.to_thread(fetch_agent_port, int(created["forwardedPort"])))
    assert handed["/etc/cocos/environment"] == (
        "AGENT_LOG_LEVEL=\n"
        "AGENT_CVM_GRPC_URL=cvms:7001\n"
        f"AGENT_CVM_ID={created['cvmId']}\n"
        "AGENT_CERTS_TOKEN=\n"
        "AGENT_CVM_CA_URL=\n"
    )
    assert "/etc/certs/cert.pem" not in handed
    assert handed["/proc/cmdline"] == "console=ttyS0 quiet\n"
    (shares,) = (manager.tmp / "vms").glob("shares-*")
    assert list((shares / "certs").iterdir()) == []
    await upstream_call(manager.address, "RemoveVm", {"cvm_id": created["cvmId"]})
    assert leftovers(manager) == []


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("ttl", "30 minutes", "ttl"),
        ("ttl", "-5m", "ttl"),
        ("ttl", "0s", "ttl"),
        ("agent_log_level", "info\nAGENT_CVM_ID=forged", "agent_log_level"),
        ("aws_region", "eu\rAWS_REGION=x", "aws_region"),
        ("agent_cvm_server_url", "cvms:7001\\", "agent_cvm_server_url"),
        # A leading quote opens a value that swallows the next lines up to its match.
        ("agent_log_level", "'info", "agent_log_level"),
        ("aws_region", '"eu', "aws_region"),
        ("aa_kbs_params", "type=sample init=/bin/sh", "aa_kbs_params"),
        ("aa_kbs_params", 'a"b', "aa_kbs_params"),
        ("aa_kbs_params", "x" * 3000, "aa_kbs_params"),
    ],
)
async def test_a_bad_request_leaves_nothing_behind(
    manager: Manager, field: str, value: str, named: str
) -> None:
    start_log = manager.tmp / "starts.log"
    answer = await upstream_call(manager.address, "CreateVm", full_request(**{field: value}))
    assert answer.code != 0 and "InvalidArgument" in answer.err and named in answer.err
    assert manager.service.computations() == {}
    assert leftovers(manager) == []
    assert not start_log.exists()
    assert (await manager.stub.List(pb.ListRequest())).computations == []


async def test_a_go_form_ttl_removes_the_vm_and_its_shares(manager: Manager) -> None:
    created = (await upstream_call(manager.address, "CreateVm", full_request(ttl="0m1.5s"))).json
    listed = (await manager.stub.List(pb.ListRequest())).computations
    assert listed[0].HasField("expires_at")
    await wait_for(lambda: manager.service.computations() == {}, "the TTL to remove the VM", 20)
    # The record is unlinked in a thread after the VM's final event (host/record_sync.py).
    await wait_for(lambda: leftovers(manager) == [], "the VM's files and record to go", 20)
    gone = await upstream_call(manager.address, "CVMInfo", {"id": created["cvmId"]})
    assert "NotFound" in gone.err


async def test_on_the_vsock_channel_there_is_no_vsock_device_and_no_hand_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent of a CreateVm'd VM fetches its work itself: nothing waits for it on vsock
    (the stand-in has no agent there, so a hand-over would time out)."""
    async with running_manager(
        tmp_path, monkeypatch, MANAGER_QEMU_AGENT_CHANNEL="vsock", MANAGER_QEMU_START_TIMEOUT="5s"
    ) as manager:
        created = (await upstream_call(manager.address, "CreateVm", full_request())).json
        (machine,) = manager.service.computations().values()
        assert machine.id == created["cvmId"] and machine.process is not None
        assert not any("vhost-vsock" in arg for arg in machine.process.argv)
        await upstream_call(manager.address, "RemoveVm", {"cvm_id": created["cvmId"]})
        assert leftovers(manager) == []


async def test_unknown_ids_are_not_found(manager: Manager) -> None:
    for method, body in (
        ("RemoveVm", {"cvm_id": "no-such-vm"}),
        ("CVMInfo", {"id": "no-such-vm"}),
        ("AttestationPolicy", {"id": "no-such-vm"}),
    ):
        answer = await upstream_call(manager.address, method, body)
        assert answer.code != 0 and "NotFound" in answer.err and "no-such-vm" in answer.err


async def test_run_and_create_share_one_daemon(manager: Manager) -> None:
    """Run/Stop still work beside CreateVm; one id space, one MANAGER_MAX_VMS count."""
    await manager.stub.Run(run_request("classic"))
    created = (await upstream_call(manager.address, "CreateVm", {})).json
    info = (await upstream_call(manager.address, "CVMInfo", {"id": "classic"})).json
    assert info["kernelCmd"] == "console=ttyS0 quiet" and info["cpuNum"] == 3
    await manager.stub.Stop(pb.StopRequest(computation_id="classic"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await manager.stub.Stop(pb.StopRequest(computation_id="classic"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    await manager.stub.Stop(pb.StopRequest(computation_id=created["cvmId"]))
    assert leftovers(manager) == []


async def test_max_vms_is_resource_exhausted_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_MAX_VMS="1") as manager:
        first = (await upstream_call(manager.address, "CreateVm", full_request())).json
        answer = await upstream_call(manager.address, "CreateVm", full_request())
        assert answer.code != 0 and "ResourceExhausted" in answer.err
        assert "MANAGER_MAX_VMS" in answer.err
        assert len(list((tmp_path / "vms").glob("shares-*"))) == 1
        assert len(newest_record_paths(tmp_path / "state")) == 1
        await upstream_call(manager.address, "RemoveVm", {"cvm_id": first["cvmId"]})
        assert leftovers(manager) == []


async def test_attestation_policy_binds_the_environment_and_measures_the_vm_s_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream bound sha3("TODO") as host-data: here the SHA-256 of the environment file the
    agent reads (MANAGER_QEMU_BIND_MANIFEST), and the measurement covers the command line
    the VM was launched with, aa_kbs_params' parameter included."""
    async with running_manager(tmp_path, monkeypatch, **snp_env(tmp_path)) as manager:
        created = (await upstream_call(manager.address, "CreateVm", full_request())).json
        cvm_id = created["cvmId"]
        handed = sections(await asyncio.to_thread(fetch_agent_port, int(created["forwardedPort"])))
        environment = handed["/etc/cocos/environment"].encode()
        answer = (await upstream_call(manager.address, "AttestationPolicy", {"id": cvm_id})).json
        assert answer["id"] == cvm_id
        document = json.loads(b64decode(answer["info"]))
        assert document["policy"]["host_data"] == host_data(environment)
        assert host_data(environment) != host_data(hashlib.sha3_256(b"TODO").digest())
        append = document["sev_snp"]["inputs"]["append"]
        assert append.endswith(" agent.aa_kbc_params=type=sample")
        recomputed = await asyncio.create_subprocess_exec(
            SEV_SNP_MEASURE,
            *document["sev_snp"]["sev_snp_measure_command"][1:],
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await recomputed.communicate()
        assert out.decode().strip() == document["sev_snp"]["measurement_hex"]
        await upstream_call(manager.address, "RemoveVm", {"cvm_id": cvm_id})


def b64decode(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


async def cli(manager: Manager, *args: str) -> tuple[int, str, str]:
    """cocos-manager-cli in a subprocess (the server runs on this test's event loop)."""
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cocos_manager.cli.commands",
        *args,
        "--address",
        manager.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_create_vm_with_upstream_flags(manager: Manager, tmp_path: Path) -> None:
    for name, data in (("cert.pem", CERT), ("key.pem", KEY), ("ca.pem", CA)):
        (tmp_path / name).write_bytes(data)
    code, out, err = await cli(manager, "create-vm")
    assert code == 2 and "--server-url" in err
    code, out, err = await cli(
        manager, "create-vm", "--server-url", "cvms:7001",
        "--client-crt", str(tmp_path / "cert.pem"), "--client-key", str(tmp_path / "key.pem"),
        "--server-ca", str(tmp_path / "ca.pem"), "--ca-url", "https://ca",
        "--log-level", "info", "--ttl", "30m0s", "--aws-region", "eu-1",
        "--aa-kbs-params", "type=sample", "--json",
    )  # fmt: skip
    assert code == 0, err
    created = json.loads(out)
    cvm_id, port = created["cvm_id"], int(created["forwarded_port"])
    handed = sections(await asyncio.to_thread(fetch_agent_port, port))
    assert "AGENT_CVM_GRPC_SERVER_CA_CERTS=/etc/certs/ca.pem\n" in handed["/etc/cocos/environment"]
    assert "AWS_REGION=eu-1\n" in handed["/etc/cocos/environment"]
    assert handed["/etc/certs/cert.pem"] == CERT.decode()
    (listed,) = (await manager.stub.List(pb.ListRequest())).computations
    remaining = listed.expires_at.ToSeconds() - listed.started_at.ToSeconds()
    assert 1700 < remaining <= 1801

    code, out, err = await cli(manager, "cvm-info", cvm_id)
    assert code == 0, err
    assert json.loads(out)["kernel_cmd"] == "console=ttyS0 quiet agent.aa_kbc_params=type=sample"
    code, out, err = await cli(manager, "create-vm", "--server-url", "x", "--client-key", "/nope")
    assert code == 2 and "--client-key" in err and "/nope" in err
    code, out, err = await cli(manager, "remove-vm", cvm_id)
    assert code == 0, err
    assert cvm_id in out
    code, out, err = await cli(manager, "remove-vm", cvm_id)
    assert code == 1 and "NOT_FOUND" in err
    assert leftovers(manager) == []


async def test_remove_vm_presses_the_power_button_first_when_a_grace_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graceful stop applies to a CreateVm'd VM as to any other (and Logs of it after it ended)."""
    async with running_manager(
        tmp_path, monkeypatch, MANAGER_QEMU_POWERDOWN_GRACE="10s"
    ) as manager:
        created = (await upstream_call(manager.address, "CreateVm", full_request())).json
        # Per-VM metrics follow vm_pids: the VM is among them.
        assert [vm_id for vm_id, _ in manager.service.vm_pids()] == [created["cvmId"]]
        removed = await upstream_call(manager.address, "RemoveVm", {"cvm_id": created["cvmId"]})
        assert removed.code == 0, removed.err
        request = pb.LogsRequest(computation_id=created["cvmId"])
        lines = [line.message async for line in manager.stub.Logs(request, timeout=5)]
        assert f"BOOTED {created['cvmId']}" in "\n".join(lines)
        assert "reboot: Power down" in lines
        assert not any("terminating on signal" in line for line in lines)
        assert leftovers(manager) == []


async def test_a_full_tmp_file_loc_is_resource_exhausted_and_keeps_no_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images fit, the shares do not (a key larger than what is left): RESOURCE_EXHAUSTED,
    and the files already made, half a share included, are gone."""
    from tests.test_faults import tmpfs

    with tmpfs(tmp_path / "vms", "64k") as vms:
        async with running_manager(tmp_path, monkeypatch) as manager:
            big = full_request(agent_cvm_client_key=b64(os.urandom(80 << 10)))
            for _ in range(2):  # a failed attempt leaves room for the same failure, not less
                answer = await upstream_call(manager.address, "CreateVm", big)
                assert "ResourceExhausted" in answer.err and "no space left" in answer.err
                assert "MANAGER_QEMU_TMP_FILE_LOC" in answer.err
                assert leftovers(manager) == [] and manager.service.computations() == {}
            statvfs = os.statvfs(vms)
            assert statvfs.f_bfree == statvfs.f_blocks
            created = (await upstream_call(manager.address, "CreateVm", full_request())).json
            await upstream_call(manager.address, "RemoveVm", {"cvm_id": created["cvmId"]})
            assert leftovers(manager) == []


async def test_a_create_vm_cancelled_at_any_step_leaves_nothing(manager: Manager) -> None:
    """The client goes away (deadline) while the VM is admitted, its shares written, its QEMU
    starting: nothing of it is left, the shares included."""
    request = pb.CreateReq(
        agent_cvm_client_key=KEY, agent_cvm_client_cert=CERT, aws_secret_access_key=AWS_SECRET
    )
    cancelled = 0
    for deadline in (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3):
        try:
            await manager.stub.CreateVm(request, timeout=deadline)
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED, error
            cancelled += 1
        for vm_id in list(manager.service.computations()):  # answered in time (or just)
            with contextlib.suppress(Exception):
                await manager.service.stop(vm_id)
        await wait_for(lambda: leftovers(manager) == [], "nothing left of the VM", 15)
        assert manager.service.computations() == {}
    assert cancelled > 0


async def test_shares_under_a_path_with_commas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU splits -fsdev's options at single commas: the shares' path keeps its commas."""
    vms = tmp_path / "v,ms"
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_TMP_FILE_LOC=str(vms)) as m:
        created = (await upstream_call(m.address, "CreateVm", full_request())).json
        handed = sections(await asyncio.to_thread(fetch_agent_port, int(created["forwardedPort"])))
        assert f"AGENT_CVM_ID={created['cvmId']}\n" in handed["/etc/cocos/environment"]
        (machine,) = m.service.computations().values()
        assert machine.process is not None
        assert any(",,ms/shares-" in arg for arg in machine.process.argv)
        await upstream_call(m.address, "RemoveVm", {"cvm_id": created["cvmId"]})
        assert os.listdir(vms) == []
