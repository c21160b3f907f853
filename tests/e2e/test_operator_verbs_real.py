"""The operator verbs against the real daemon and the real guest under QEMU (TCG): a Run of its
own size, Pause freezing the guest (it stops serving) and Resume thawing it (it serves again),
and a forced Stop that does not wait out a long power-down grace."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import (
    BOOT_TIMEOUT,
    Daemon,
    assert_gone,
    read_agent,
    start_daemon,
    stop_daemon,
    stopping_leftovers,
)
from tests.support.harness import run_request

pytestmark = pytest.mark.timeout(300)

# Far beyond the bounds below: a Stop that waited for the guest could not pass.
GRACE = "10m"
FROZEN_FOR = 3.0  # a running test guest answers at once; a paused one never does


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    started = start_daemon(
        tmp_path / "daemon",
        MANAGER_QEMU_POWERDOWN_GRACE=GRACE,
        MANAGER_QEMU_MAX_SMP="2",
        MANAGER_QEMU_MAX_MEMORY_PER_VM="768M",
    )
    try:
        yield started
    finally:
        stop_daemon(started)


@pytest.fixture
async def stub(daemon: Daemon) -> AsyncIterator[pb_grpc.ManagerServiceStub]:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        yield pb_grpc.ManagerServiceStub(channel)


async def served_while_frozen(port: int) -> bytes:
    """What the guest sends on a connection made while it is paused, read for FROZEN_FOR
    seconds (slirp, in QEMU's main loop, still accepts; only the guest can answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(reader.read(), FROZEN_FOR)
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_a_sized_real_guest_pauses_resumes_and_stops_by_force(
    daemon: Daemon, stub: pb_grpc.ManagerServiceStub
) -> None:
    cid = "e2e-verbs"
    request = run_request(cid)
    request.vcpus, request.memory_mib = 2, 768
    async with stopping_leftovers(stub, cid):
        response = await stub.Run(request, timeout=BOOT_TIMEOUT)
        port = int(response.agent_port)
        vm = daemon.vm(port)
        files = daemon.files_of(vm)
        assert vm.option("-smp") == ["2,maxcpus=64"]
        assert vm.option("-m") == ["768M,slots=5,maxmem=30G"]
        assert await read_agent(port) == manifest_json(request)  # it serves

        await stub.Pause(pb.PauseRequest(computation_id=cid), timeout=60)
        got = await stub.Get(pb.GetRequest(computation_id=cid))
        assert (got.computation.state, got.paused_by) == ("paused", "operator")
        assert (got.vcpus, got.memory_mib) == (2, 768)
        assert await served_while_frozen(port) == b""  # the guest does not run
        assert vm.process.is_running()  # QEMU does

        await stub.Resume(pb.ResumeRequest(computation_id=cid), timeout=60)
        assert await read_agent(port) == manifest_json(request)  # it serves again
        (listed,) = (await stub.List(pb.ListRequest())).computations
        assert listed.state == "running"

        await stub.Stop(pb.StopRequest(computation_id=cid, force=True), timeout=60)
        assert_gone(vm, files, daemon)
        ended = await stub.Get(pb.GetRequest(computation_id=cid))
        assert (ended.computation.state, ended.last_exit.reason) == ("ended", "stop")
