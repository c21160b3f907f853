"""End to end, SIGTERM with streams open: the real daemon, real QEMU (TCG) and the real test
guest. An Events subscriber of the VM, a Logs follower of its console and
`cocos-manager-cli events` are all open when the daemon is told to stop; each hears the VM
end, the subscriber and the CLI hear `manager-shutdown` last, and none of them holds the
VM's stop back (docs/decisions.md, "Shutdown and the streams")."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import BOOT_TIMEOUT, start_daemon, stop_daemon
from tests.support.harness import run_request
from tests.support.waiting import subscribed

CLI = str(Path(sys.executable).with_name("cocos-manager-cli"))
pytestmark = pytest.mark.timeout(300)


async def drain(call: Any) -> tuple[list[Any], grpc.StatusCode]:
    got: list[Any] = []
    try:
        while (message := await call.read()) != grpc.aio.EOF:
            got.append(message)
    except grpc.aio.AioRpcError as error:
        return got, error.code()
    return got, await call.code()


async def test_sigterm_with_a_subscriber_a_follower_and_the_cli(tmp_path: Path) -> None:
    daemon = await asyncio.to_thread(start_daemon, tmp_path / "daemon")
    try:
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            await stub.Run(run_request("e2e-shutdown"), timeout=BOOT_TIMEOUT)
            events = stub.Events(pb.EventsRequest(computation_id="e2e-shutdown"))
            await subscribed(events)
            follow = stub.Logs(pb.LogsRequest(computation_id="e2e-shutdown", follow=True))
            assert await asyncio.wait_for(follow.read(), 30) != grpc.aio.EOF
            cli = await asyncio.create_subprocess_exec(
                CLI, "events", "--since", "0", "--address", daemon.address,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert cli.stdout is not None
            while b"vm-provision" not in (
                line := await asyncio.wait_for(cli.stdout.readline(), 30)
            ):
                assert line, "the CLI ended before printing the replay"
            vms = daemon.children()
            assert vms, "no QEMU under the daemon"
            daemon.process.send_signal(signal.SIGTERM)
            (got, code), (lines, log_code) = await asyncio.wait_for(
                asyncio.gather(drain(events), drain(follow)), 120
            )
            out, err = await asyncio.wait_for(cli.communicate(), 60)
        assert await asyncio.to_thread(daemon.process.wait, 60) == 0
        assert not [vm for vm in vms if vm.is_running()], "QEMU outlived the shutdown"
        # Agent events only: QEMU's console lines (from its keeper's file) may come between.
        seen = [
            (m.agent_event.event_type, m.agent_event.status)
            for m in got
            if m.HasField("agent_event")
        ]
        assert seen[0] == ("manager-shutdown", "starting"), seen
        assert ("vm-stop", "complete") in seen, seen
        assert seen[-1] == ("manager-shutdown", "complete"), seen
        assert code == grpc.StatusCode.OK
        assert log_code == grpc.StatusCode.OK, lines  # ended by the VM's end, not cut off
        assert cli.returncode == 3, err.decode()
        assert b"manager-shutdown" in out and b"the manager shut down" in err
    except BaseException:
        if daemon.process.poll() is None:  # failed before its SIGTERM: stopped (and checked)
            await asyncio.to_thread(stop_daemon, daemon)
        raise
