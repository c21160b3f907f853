"""End to end: a real guest's serial console survives a restart of the daemon (SIGKILL, and
SIGTERM with MANAGER_SHUTDOWN_STOPS_VMS=false, as an upgrade does): the real daemon, real
QEMU (TCG) and the real test guest (docs/decisions.md, "The console survives the daemon").

After the restart Logs has every line the guest printed before it, in order, and follows the
new ones: Stop presses the power button (MANAGER_QEMU_POWERDOWN_GRACE) and the guest's
power-off line, printed to the adopted QEMU's console, reaches the follower and the
post-mortem, which has the whole console.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import BOOT_TIMEOUT, Daemon, start_daemon, stop_daemon
from tests.support.harness import run_request

POWER_BUTTON_MARKER = "cocos-test: power button, shutting down"
SETTINGS = {"MANAGER_SHUTDOWN_STOPS_VMS": "false", "MANAGER_QEMU_POWERDOWN_GRACE": "60s"}
pytestmark = pytest.mark.timeout(400)


async def logs(stub: pb_grpc.ManagerServiceStub, computation_id: str) -> list[str]:
    stream = stub.Logs(pb.LogsRequest(computation_id=computation_id), timeout=10)
    return [line.message async for line in stream]


async def until_serving(stub: pb_grpc.ManagerServiceStub, computation_id: str) -> list[str]:
    """The console up to the guest's SERVING line (its agent serves: all of its boot)."""
    seen: list[str] = []
    stream = stub.Logs(pb.LogsRequest(computation_id=computation_id, follow=True))
    try:
        async with asyncio.timeout(BOOT_TIMEOUT):
            async for line in stream:
                seen.append(line.message)
                if line.message.endswith(f"SERVING {computation_id}"):
                    return seen
    finally:
        stream.cancel()
    raise AssertionError(f"Logs ended before SERVING: {seen[-5:]}")


def end(daemon: Daemon, kind: str) -> None:
    if kind == "sigkill":
        daemon.process.kill()
        daemon.process.wait()
    else:
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(60) == 0


@pytest.mark.parametrize("kind", ["sigkill", "sigterm"])
async def test_a_real_guests_console_survives_a_restart_of_the_daemon(
    tmp_path: Path, kind: str
) -> None:
    root = tmp_path / "daemon"
    cid = f"e2e-console-{kind}"
    first = await asyncio.to_thread(start_daemon, root, **SETTINGS)
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            response = await stub.Run(run_request(cid), timeout=BOOT_TIMEOUT)
            before = await until_serving(stub, cid)
            vm = first.vm(int(response.agent_port))
        end(first, kind)
        assert vm.process.is_running(), "the VM did not outlive the daemon"
    except BaseException:
        stop_daemon(first)
        raise
    second = await asyncio.to_thread(start_daemon, root, **SETTINGS)
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            (info,) = (await stub.List(pb.ListRequest(), timeout=5)).computations
            assert info.adopted and info.pid == vm.process.pid
            history = await logs(stub, cid)
            assert history[: len(before)] == before, (
                f"Logs after the restart lost lines from before it: {history[-5:]}"
            )
            follow = stub.Logs(pb.LogsRequest(computation_id=cid, follow=True))
            await stub.Stop(pb.StopRequest(computation_id=cid), timeout=120)
            followed = [line.message async for line in follow]
            assert followed[: len(before)] == before
            assert POWER_BUTTON_MARKER in followed[len(before) :], (
                f"the adopted guest's power-off line never reached Logs: {followed[-5:]}"
            )
            ended = await logs(stub, cid)  # the post-mortem: the whole console
            assert ended[: len(before)] == before and POWER_BUTTON_MARKER in ended
            assert not any(line.startswith("cocos-manager:") for line in ended)
            assert second.vm_files() == []
    finally:
        await stop_vm(second, cid)  # (a failed assertion above left it running)
        stop_daemon(second)


async def stop_vm(daemon: Daemon, computation_id: str) -> None:
    """The VM outlives a SIGTERM here: stopped first, whatever the test got to."""
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ManagerServiceStub(channel)
        with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND: stopped already
            await stub.Stop(pb.StopRequest(computation_id=computation_id), timeout=120)
