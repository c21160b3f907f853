"""Re-adoption across any number of restarts of either kind, and what the daemon says of a live
process it will not adopt (docs/decisions.md, "Restarts")."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import grpc
import pytest

from cocos_manager.host.processes import process_identity
from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.records import newest_record_path
from tests.vm.test_restart import alive, pid_of, records, vm_files, wait_until_gone


async def restart(daemon: Daemon, how: str) -> None:
    if how == "term":
        assert await daemon.terminate() == 0
    else:
        await daemon.kill()
    await daemon.start()


async def listed(daemon: Daemon) -> list[str]:
    reply = await daemon.stub.List(pb.ListRequest())
    return [info.computation_id for info in reply.computations]


async def test_a_vm_is_readopted_across_many_restarts_of_either_kind(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    d = Daemon(env=env, log=tmp_path / "daemon.log")
    await d.start()
    try:
        await d.stub.Run(run_request("kept"))
        pid = pid_of(tmp_path, "kept")
        for round_, how in enumerate(["term", "kill", "term", "term", "kill", "kill"]):
            await restart(d, how)
            assert await listed(d) == ["kept"], f"not re-adopted after restart {round_ + 1}"
            assert pid_of(tmp_path, "kept") == pid and alive(pid)
        await d.stub.Stop(pb.StopRequest(computation_id="kept"))
        await wait_until_gone(pid)
        assert records(tmp_path) == [] and vm_files(tmp_path) == []
    finally:
        d.env["MANAGER_SHUTDOWN_STOPS_VMS"] = "true"
        await d.terminate()


def log_lines(daemon: Daemon) -> list[dict[str, object]]:
    lines = []
    for line in daemon.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


async def test_a_live_process_not_proven_ours_is_named_at_error_level_and_kept(
    tmp_path: Path,
) -> None:
    """The recorded PID and start time, another command line: never signalled, and the
    daemon says so at error level with what finds it (PID, port, display, how to end it),
    keeping the record and the files; once it has ended, the next start cleans them."""
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    try:
        reply = await d.stub.Run(run_request("doubt"))
        pid = pid_of(tmp_path, "doubt")
        (record,) = records(tmp_path)
        await d.kill()
        path = newest_record_path(tmp_path / "state")
        doc = json.loads(path.read_text())
        doc["cmdline"] = [*doc["cmdline"], "-name", "not-the-recorded-one"]
        path.write_text(json.dumps(doc))
        identity = process_identity(pid)

        await d.start()
        assert process_identity(pid) == identity, "a process not proven ours was signalled"
        assert await listed(d) == []
        assert [r["computation_id"] for r in records(tmp_path)] == ["doubt"]
        assert len(vm_files(tmp_path)) == 6, "the files that find it were deleted"
        (line,) = [r for r in log_lines(d) if "not re-adopted" in str(r.get("message"))]
        assert line["level"] == "error"
        assert line["pid"] == pid and line["agent_port"] == int(reply.agent_port)
        assert line["vnc_display"] == record["vnc_display"]
        assert f"kill {pid}" in str(line["message"])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.Stop(pb.StopRequest(computation_id="doubt"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        os.kill(pid, signal.SIGTERM)  # the operator ends it as told
        await wait_until_gone(pid)
        await restart(d, "term")
        assert records(tmp_path) == [] and vm_files(tmp_path) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await d.terminate()


async def test_a_record_an_earlier_version_wrote_after_adoption_is_adopted(
    tmp_path: Path,
) -> None:
    """The version before this fix wrote `"cmdline": []` after each adoption: such a record is
    proven by the argv the daemon exec'd (which names the VM's UUID), as a starting one is,
    so an upgrade from it keeps its VMs."""
    env = {**base_env(tmp_path), "MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    d = Daemon(env=env, log=tmp_path / "daemon.log")
    await d.start()
    try:
        await d.stub.Run(run_request("upgraded"))
        pid = pid_of(tmp_path, "upgraded")
        assert await d.terminate() == 0
        path = newest_record_path(tmp_path / "state")
        doc = json.loads(path.read_text())
        doc["cmdline"] = []
        path.write_text(json.dumps(doc))
        await d.start()
        assert await listed(d) == ["upgraded"] and alive(pid)
        (record,) = records(tmp_path)
        identity = process_identity(pid)
        assert identity is not None and record["cmdline"] == identity[1]
        await d.stub.Stop(pb.StopRequest(computation_id="upgraded"))
        await wait_until_gone(pid)
    finally:
        d.env["MANAGER_SHUTDOWN_STOPS_VMS"] = "true"
        await d.terminate()
