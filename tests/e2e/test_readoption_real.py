"""End to end: one real TCG guest kept across five restarts of the daemon in a row, SIGTERM
(with MANAGER_SHUTDOWN_STOPS_VMS=false, as an upgrade does) and SIGKILL mixed: each start
re-adopts the same QEMU, and the guest's agent still serves its manifest at the end."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import psutil
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import (
    BOOT_TIMEOUT,
    DAEMON_STOP_TIMEOUT,
    Daemon,
    kill,
    read_agent,
    start_daemon,
    stop_daemon,
)
from tests.support.harness import run_request

pytestmark = pytest.mark.timeout(600)
LEAVE = {"MANAGER_SHUTDOWN_STOPS_VMS": "false"}


async def listed(daemon: Daemon) -> list[pb.ComputationInfo]:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        reply = await pb_grpc.ManagerServiceStub(channel).List(pb.ListRequest(), timeout=10)
    return list(reply.computations)


def sigterm(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(DAEMON_STOP_TIMEOUT) == 0, daemon.log_tail()


async def test_a_real_guest_survives_five_restarts_of_either_kind(tmp_path: Path) -> None:
    root = tmp_path / "daemon"
    daemon = await asyncio.to_thread(start_daemon, root, **LEAVE)
    qemu: psutil.Process | None = None
    try:
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            reply = await stub.Run(run_request("e2e-kept"), timeout=BOOT_TIMEOUT)
        port = int(reply.agent_port)
        served = json.loads(await read_agent(port))
        assert served["id"] == "e2e-kept"
        qemu = daemon.vm(port).process
        for restart, how in enumerate(["term", "kill", "term", "kill", "term"], 1):
            await asyncio.to_thread(sigterm if how == "term" else kill, daemon)
            assert qemu.is_running(), f"QEMU ended with the daemon at restart {restart}"
            daemon = await asyncio.to_thread(start_daemon, root, **LEAVE)
            infos = await listed(daemon)
            assert [(i.computation_id, i.pid, i.adopted) for i in infos] == [
                ("e2e-kept", qemu.pid, True)
            ], f"not re-adopted at restart {restart} ({how})\n{daemon.log_tail()}"
            assert "not re-adopted" not in daemon.log_tail(100_000)
        assert json.loads(await read_agent(port))["id"] == "e2e-kept"  # still serving
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            await stub.Stop(pb.StopRequest(computation_id="e2e-kept"), timeout=60)
        await asyncio.to_thread(qemu.wait, 30)
        assert daemon.vm_files() == []
        assert list((root / "state").glob("vm-*")) == []
    finally:
        if qemu is not None and qemu.is_running():
            qemu.kill()
        await asyncio.to_thread(stop_daemon, daemon)
