"""CreateVm'd VMs across a daemon SIGKILL: a Go-form ttl still removes its VM (QEMU, shares,
files, record) under the restarted daemon; a VM without one is re-adopted (CVMInfo of it as
launched); a VM whose QEMU died meanwhile leaves no share behind either. And what the request carried that is secret (key bytes, the
AWS secret, the certs token) is in no log line nor record of the real daemon at debug level.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env
from tests.support.upstream_client import b64, upstream_call
from tests.support.waiting import wait_for
from tests.test_create_vm import AWS_SECRET, KEY, full_request
from tests.vm.test_restart import pid_of, wait_until_gone


def shares(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "vms").glob("shares-*"))


def everything_left(tmp_path: Path) -> list[str]:
    vms = tmp_path / "vms"
    return sorted(os.listdir(vms)) + sorted(p.name for p in (tmp_path / "state").glob("vm-*"))


async def test_a_go_form_ttl_removes_the_vm_across_a_sigkill(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "MANAGER_LOG_LEVEL": "debug"}
    first = Daemon(env=env, log=tmp_path / "daemon-1.log")
    await first.start()
    try:
        timed = (await upstream_call(first.address, "CreateVm", full_request(ttl="0m4s"))).json
        doomed = (await upstream_call(first.address, "CreateVm", full_request())).json
        kept = (await upstream_call(first.address, "CreateVm", full_request())).json
        listed = {
            c.computation_id: c for c in (await first.stub.List(pb.ListRequest())).computations
        }
        assert listed[timed["cvmId"]].HasField("expires_at")
        assert not listed[kept["cvmId"]].HasField("expires_at")
        pid = pid_of(tmp_path, timed["cvmId"])
        doomed_pid = pid_of(tmp_path, doomed["cvmId"])
        assert len(shares(tmp_path)) == 3
    finally:
        await first.kill()
    # While no daemon watches, one VM's QEMU dies: its shares must go all the same.
    os.kill(doomed_pid, signal.SIGKILL)
    await wait_until_gone(doomed_pid)

    second = Daemon(env=env, log=tmp_path / "daemon-2.log")
    await second.start()
    try:
        # The timed VM is stopped by its TTL: at once if the deadline passed while no daemon
        # ran, else once re-adopted. Either way its QEMU and its shares go.
        await wait_until_gone(pid, timeout=30)
        await wait_for(lambda: len(shares(tmp_path)) == 1, "only the kept VM's shares", 10)
        listed_after = (await second.stub.List(pb.ListRequest())).computations
        assert [(c.computation_id, c.adopted) for c in listed_after] == [(kept["cvmId"], True)]
        info = (await upstream_call(second.address, "CVMInfo", {"id": kept["cvmId"]})).json
        assert info["kernelCmd"].endswith(" agent.aa_kbc_params=type=sample")
        removed = await upstream_call(second.address, "RemoveVm", {"cvm_id": kept["cvmId"]})
        assert removed.code == 0, removed.err
        assert everything_left(tmp_path) == []
    finally:
        await second.terminate()

    secrets = (b"key-bytes-never-logged", AWS_SECRET.encode(), b64(KEY).encode(), b"token-1")
    logs = [tmp_path / "daemon-1.log", tmp_path / "daemon-2.log"]
    for path in [*logs, *(tmp_path / "state").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in secrets if s in data], path
    # The logs did see the VMs (a log that says nothing proves nothing).
    first_log = logs[0].read_text()
    assert kept["cvmId"] in first_log and "VM running" in first_log
    assert any(
        json.loads(line).get("message") == "VM re-adopted after restart"
        for line in logs[1].read_text().splitlines()
        if line.startswith("{")
    )


async def test_a_sigkill_while_the_vm_starts_leaves_no_share(tmp_path: Path) -> None:
    """The daemon dies after the shares were written but before QEMU answered: the next
    start kills that QEMU and removes the shares with the rest."""
    env = {**base_env(tmp_path), "FAKE_QEMU_MODE": "no-qmp"}
    first = Daemon(env=env, log=tmp_path / "daemon-1.log")
    await first.start()
    creating = asyncio.ensure_future(upstream_call(first.address, "CreateVm", full_request()))
    try:
        await wait_for(lambda: shares(tmp_path) != [], "the shares to be written", 20)
        await wait_for(lambda: len(recorded(tmp_path)) == 1, "QEMU to be recorded", 20)
    finally:
        await first.kill()
        await creating
    second = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon-2.log")
    await second.start()
    try:
        assert everything_left(tmp_path) == []
        assert (await second.stub.List(pb.ListRequest())).computations == []
    finally:
        await second.terminate()


def recorded(tmp_path: Path) -> list[int]:
    pids = []
    for path in (tmp_path / "state").glob("vm-*.json"):
        try:
            pid = int(json.loads(path.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if pid:
            pids.append(pid)
    return pids
