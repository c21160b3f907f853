"""End to end, the seed's "Verifying VM launch": a computations server of the seed's era, the
real daemon dialling it (MANAGER_GRPC_URL), real QEMU under TCG and the real test guest.

The server (tests/support/computations_server.py, generated from the seed's proto alone)
pushes the seed's own request on every connection, as `go run ./test/computations/main.go`
does. The test checks what that server gets back: run_res with the forwarded port (where the
guest's agent serves the manifest of that very request), the Manager's events and the guest's
console lines; a bad request answered with a failed event; and, after the server restarts,
the Manager reconnecting and serving the request again.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import BOOT_TIMEOUT, read_agent, start_daemon, stop_daemon
from tests.support.computations_server import (
    ComputationsServer,
    details,
    event_for,
    log_for,
    run_res_for,
)

pytestmark = pytest.mark.timeout(300)


def seed_request(data: Path, algo: Path) -> pb.ComputationRunReq:
    """What the seed's test server sends, built here from the daemon's proto: its manifest is
    what the guest must serve."""
    return pb.ComputationRunReq(
        id="1",
        name="sample computation",
        description="sample description",
        datasets=[
            pb.Dataset(
                id="1", provider="provider1", hash=hashlib.sha3_256(data.read_bytes()).digest()
            )
        ],
        algorithm=pb.Algorithm(
            id="1", provider="provider1", hash=hashlib.sha3_256(algo.read_bytes()).digest()
        ),
        result_consumers=["consumer1"],
        agent_config=pb.AgentConfig(port="7002", log_level="debug"),
    )


async def test_the_seeds_computations_server_gets_ports_events_and_logs_before_and_after_a_restart(
    tmp_path: Path,
) -> None:
    data, algo = tmp_path / "iris.csv", tmp_path / "lin_reg.py"
    data.write_text("sepal_length,sepal_width\n5.1,3.5\n")
    algo.write_text("print('linear regression')\n")
    expected = manifest_json(seed_request(data, algo))
    server = ComputationsServer(tmp_path / "computations.log", seed_request=(str(data), str(algo)))
    await server.start()
    daemon = None
    try:
        daemon = await asyncio.to_thread(
            start_daemon, tmp_path / "daemon", MANAGER_GRPC_URL=server.url
        )
        res = await server.wait_for(run_res_for("1"), BOOT_TIMEOUT, "run_res")
        port = int(res["run_res"]["agent_port"])
        daemon.vm(port)  # a QEMU child of the daemon forwards that port
        assert await read_agent(port) == expected
        await server.wait_for(log_for("1", "BOOTED 1"), 30, "the guest's console line")
        complete = await server.wait_for(event_for("1", "vm-provision", "complete"), 5, "complete")
        assert details(complete)["agent_port"] == port

        no_algorithm = {"id": "bad", "agent_config": {"port": "7002"}}
        await server.push(no_algorithm)
        failed = await server.wait_for(event_for("bad", "vm-provision", "failed"), 10, "failed")
        assert details(failed)["code"] == "INVALID_ARGUMENT"

        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            await stub.Stop(pb.StopRequest(computation_id="1"), timeout=60)
        await server.wait_for(event_for("1", "vm-stop", "complete"), 10, "vm-stop")

        # The server restarts; the Manager reconnects and serves its request again.
        await server.stop()
        lines = len(server.lines)
        await server.start()
        res = await server.wait_for(run_res_for("1"), BOOT_TIMEOUT, "run_res again", lines)
        port = int(res["run_res"]["agent_port"])
        assert await read_agent(port) == expected
        await server.wait_for(log_for("1", "BOOTED 1"), 30, "the console again", lines)
    finally:
        if daemon is not None:
            await asyncio.to_thread(stop_daemon, daemon)
        await server.stop()
