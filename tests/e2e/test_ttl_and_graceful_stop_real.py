"""End to end, for the TTL and the graceful stop: the real daemon, real QEMU (TCG) and the real
test guest (docs/architecture.md, "How a VM ends").

- A 20-second TTL survives a SIGKILL of the daemon: the restarted daemon adopts the VM with
  its deadline and stops it then, as Stop does.
- With MANAGER_QEMU_POWERDOWN_GRACE, Stop presses the power button and the guest powers
  itself off cleanly inside the grace (its marker line in Logs, QEMU's exit status 0).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import BOOT_TIMEOUT, start_daemon, stop_daemon
from tests.support.harness import run_request
from tests.support.waiting import subscribed

POWER_BUTTON_MARKER = "cocos-test: power button, shutting down"
pytestmark = pytest.mark.timeout(300)


async def manager_event(
    events: AsyncIterator[pb.ClientStreamMessage], event_type: str, status: str
) -> dict[str, object]:
    async for message in events:
        event = message.agent_event
        if event.event_type == event_type and event.status == status:
            return json.loads(event.details) if event.details else {}
    raise AssertionError(f"the stream ended before {event_type} {status}")


def exited(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_20s_ttl_survives_a_sigkill_of_the_daemon(tmp_path: Path) -> None:
    root = tmp_path / "daemon"
    first = await asyncio.to_thread(start_daemon, root)
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            request = run_request("e2e-ttl")
            request.ttl = "20s"
            response = await stub.Run(request, timeout=BOOT_TIMEOUT)
            vm = first.vm(int(response.agent_port))
            (info,) = (await stub.List(pb.ListRequest(), timeout=5)).computations
            deadline = info.expires_at.ToMilliseconds() / 1000
            assert 0 < deadline - time.time() <= 20
        first.process.kill()  # SIGKILL: no clean-up, the VM lives on
        first.process.wait()
        assert vm.process.is_running()
    except BaseException:
        stop_daemon(first)
        raise
    second = await asyncio.to_thread(start_daemon, root)  # the same state directory
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            (info,) = (await stub.List(pb.ListRequest(), timeout=5)).computations
            assert info.adopted and info.pid == vm.process.pid
            assert info.expires_at.ToMilliseconds() / 1000 == pytest.approx(deadline, abs=0.01)
            events = stub.Events(pb.EventsRequest(computation_id="e2e-ttl"))
            await subscribed(events)
            details = await asyncio.wait_for(manager_event(events, "vm-stop", "starting"), 60)
            assert details["reason"] == "ttl"
            assert time.time() >= deadline - 0.01
            await asyncio.wait_for(manager_event(events, "vm-stop", "complete"), 60)
            events.cancel()
            # Exited; a zombie at most (not the restarted daemon's child: init reaps it).
            assert exited(vm.process)
            assert list((await stub.List(pb.ListRequest(), timeout=5)).computations) == []
    finally:
        stop_daemon(second)


async def test_stop_with_a_grace_lets_the_guest_power_off_cleanly(tmp_path: Path) -> None:
    daemon = await asyncio.to_thread(
        start_daemon, tmp_path / "daemon", MANAGER_QEMU_POWERDOWN_GRACE="60s"
    )
    try:
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            cid = "e2e-gentle"
            await stub.Run(run_request(cid), timeout=BOOT_TIMEOUT)
            follow = stub.Logs(pb.LogsRequest(computation_id=cid, follow=True))
            async for line in follow:  # the guest handles the button once it serves
                if line.message.endswith(f"SERVING {cid}"):
                    break
            events = stub.Events(pb.EventsRequest(computation_id=cid))
            await subscribed(events)
            began = time.monotonic()
            await stub.Stop(pb.StopRequest(computation_id=cid), timeout=120)
            took = time.monotonic() - began
            rest = [line.message async for line in follow]
            details = await asyncio.wait_for(manager_event(events, "vm-stop", "complete"), 10)
            events.cancel()
            assert POWER_BUTTON_MARKER in rest
            assert not any("terminating on signal" in line for line in rest)
            assert details["exit"] == "exit status 0"
            assert took < 60
            print(f"Stop with the power button took {took:.2f} s")
    finally:
        stop_daemon(daemon)
