"""List and Logs against the real daemon and the real guest under QEMU (TCG), through grpcurl
as an operator would: a running VM's console followed to its serial lines, and the console of
a VM that ended (stopped, or powered off by itself) read afterwards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.api.test_grpcurl import grpcurl
from tests.e2e.test_real_vm import (
    BOOT_TIMEOUT,
    Daemon,
    start_daemon,
    stop_daemon,
    stopping_leftovers,
)
from tests.support.harness import run_request
from tests.support.waiting import subscribed

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    started = start_daemon(tmp_path / "daemon")
    try:
        yield started
    finally:
        stop_daemon(started)


@pytest.fixture
async def stub(daemon: Daemon) -> AsyncIterator[pb_grpc.ManagerServiceStub]:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        yield pb_grpc.ManagerServiceStub(channel)


async def grpcurl_json(daemon: Daemon, method: str, request: dict[str, object]) -> list[Any]:
    """Every message grpcurl printed (one JSON document each)."""
    code, out, err = await grpcurl(
        "-plaintext", "-d", json.dumps(request), daemon.address, f"manager.ManagerService/{method}"
    )
    assert code == 0, err
    decoder, documents, text = json.JSONDecoder(), list[Any](), out.strip()
    while text:
        document, end = decoder.raw_decode(text)
        documents.append(document)
        text = text[end:].strip()
    return documents


async def follow_until(stream: AsyncIterator[pb.AgentLog], text: str) -> list[str]:
    seen = []
    async for line in stream:
        seen.append(line.message)
        if line.message.endswith(text):
            return seen
    raise AssertionError(f"the console ended before {text!r}: {seen[-20:]}")


async def test_list_and_logs_of_a_real_guest_running_and_ended(
    daemon: Daemon, stub: pb_grpc.ManagerServiceStub
) -> None:
    cid = "e2e-ops"
    async with stopping_leftovers(stub, cid):
        response = await stub.Run(run_request(cid), timeout=BOOT_TIMEOUT)
        vm = daemon.vm(int(response.agent_port))
        (listed,) = await grpcurl_json(daemon, "List", {})
        (info,) = listed["computations"]
        assert info["computation_id"] == cid and info["state"] == "running"
        assert info["pid"] == vm.process.pid
        assert info["agent_port"] == response.agent_port

        follow = stub.Logs(pb.LogsRequest(computation_id=cid, follow=True))
        lines = await asyncio.wait_for(follow_until(follow, f"SERVING {cid}"), BOOT_TIMEOUT)
        assert f"BOOTED {cid}" in lines
        assert any("Linux version" in line for line in lines)  # the kernel's own console

        await stub.Stop(pb.StopRequest(computation_id=cid), timeout=60)
        async for _ in follow:  # the follower's stream ends with the VM
            pass
        assert await grpcurl_json(daemon, "List", {}) == [{}]  # no computations

        # The post-mortem of the stopped VM, through grpcurl.
        kept = await grpcurl_json(daemon, "Logs", {"computation_id": cid})
        messages = [line["message"] for line in kept]
        assert messages[: len(lines)] == lines
        tail = await grpcurl_json(daemon, "Logs", {"computation_id": cid, "tail": 2})
        assert [line["message"] for line in tail] == messages[-2:]


async def test_logs_say_why_a_guest_ended_by_itself(
    daemon: Daemon, stub: pb_grpc.ManagerServiceStub
) -> None:
    cid = "e2e-ops-poweroff"
    request = run_request(cid, description="cocos-test:poweroff (the test guest powers off)")
    async with stopping_leftovers(stub, cid):
        events = stub.Events(pb.EventsRequest(computation_id=cid))
        await subscribed(events)
        await stub.Run(request, timeout=BOOT_TIMEOUT)

        async def vm_exit() -> None:
            async for message in events:
                if message.agent_event.event_type == "vm-exit":
                    return

        await asyncio.wait_for(vm_exit(), BOOT_TIMEOUT)
        events.cancel()
    kept = [line.message async for line in stub.Logs(pb.LogsRequest(computation_id=cid))]
    assert f"POWEROFF {cid}" in kept, kept[-20:]
    assert kept.index(f"BOOTED {cid}") < kept.index(f"POWEROFF {cid}")
