"""Restart survival: the daemon dies (SIGKILL, or SIGTERM that leaves VMs for an upgrade),
starts again, re-adopts every QEMU that is provably its own, and cleans up the rest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cocos_manager.config.settings import load_settings
from cocos_manager.daemon import DaemonRunner
from cocos_manager.events.subscription import Subscription
from cocos_manager.host.processes import process_identity
from cocos_manager.host.state_store import VmRecord
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry.metrics import METRICS
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.harness import test_tracer_provider as tracer_provider
from tests.support.records import newest_record_path, newest_records
from tests.support.waiting import GUARD, subscribed, wait_for


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    yield d
    if d.process is not None and d.process.poll() is None:
        await d.terminate()


def records(tmp_path: Path) -> list[dict[str, object]]:
    return newest_records(tmp_path / "state")


def recorded_pids(tmp_path: Path) -> list[int]:
    """PIDs the records name so far (a record names its QEMU from STARTING on); a record
    being written right now is read on the next poll."""
    pids = set()
    for path in (tmp_path / "state").glob("vm-*.json"):
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(json.loads(path.read_text())["pid"]))
    return sorted(pid for pid in pids if pid)


def pid_of(tmp_path: Path, computation_id: str) -> int:
    for record in records(tmp_path):
        if record["computation_id"] == computation_id:
            return int(str(record["pid"]))
    raise KeyError(computation_id)


def alive(pid: int) -> bool:
    """Exists and is not a zombie. Not process_identity: a stand-in QEMU still exec'ing its
    interpreter chain (env, a pyenv shim) shows an empty command line for a moment."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


async def wait_until_gone(pid: int, timeout: float = 10.0) -> None:
    await wait_for(lambda: not alive(pid), f"process {pid} to end", timeout)


def vm_files(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "vms"))


async def test_sigkill_then_restart_readopts_and_stops(daemon: Daemon, tmp_path: Path) -> None:
    first = await daemon.stub.Run(run_request("keep"))
    await daemon.stub.Run(run_request("lost"))
    keep, lost = pid_of(tmp_path, "keep"), pid_of(tmp_path, "lost")
    assert {r["state"] for r in records(tmp_path)} == {"running"}

    await daemon.kill()
    assert alive(keep) and alive(lost), "VMs must outlive the daemon"
    os.kill(lost, signal.SIGKILL)  # one VM dies while no daemon watches
    await wait_until_gone(lost)

    await daemon.start()
    assert [r["computation_id"] for r in records(tmp_path)] == ["keep"]
    assert len(vm_files(tmp_path)) == 6  # only the survivor's files remain (console included)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await daemon.stub.Run(run_request("keep"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    second = await daemon.stub.Run(run_request("lost"))  # the dead VM's id is free again
    assert second.agent_port != first.agent_port  # the survivor's port is still held

    await daemon.stub.Stop(pb.StopRequest(computation_id="keep"))
    await wait_until_gone(keep)
    await daemon.stub.Stop(pb.StopRequest(computation_id="lost"))
    assert records(tmp_path) == [] and vm_files(tmp_path) == []


async def test_adopted_vm_exit_is_noticed_at_once(daemon: Daemon, tmp_path: Path) -> None:
    await daemon.stub.Run(run_request("watched"))
    pid = pid_of(tmp_path, "watched")
    await daemon.kill()
    await daemon.start()
    assert [r["computation_id"] for r in records(tmp_path)] == ["watched"], "not re-adopted"
    events = daemon.stub.Events(pb.EventsRequest(computation_id="watched"))
    await subscribed(events)
    os.kill(pid, signal.SIGKILL)
    async for message in events:
        if message.agent_event.event_type == "vm-exit":
            break
    assert message.agent_event.status == "failed"
    # The record is unlinked in a thread after the final event (an ext4 unlink can wait for
    # the journal): gone soon after vm-exit, not necessarily before the client reads it.
    await wait_for(lambda: records(tmp_path) == [] and vm_files(tmp_path) == [], "its record")
    await daemon.stub.Run(run_request("watched"))


async def test_a_reused_pid_is_never_adopted_nor_killed(daemon: Daemon, tmp_path: Path) -> None:
    await daemon.stub.Run(run_request("victim"))
    pid = pid_of(tmp_path, "victim")
    await daemon.kill()
    os.kill(pid, signal.SIGKILL)
    await wait_until_gone(pid)
    stranger = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220
    try:
        path = newest_record_path(tmp_path / "state")
        doc = json.loads(path.read_text())
        doc["pid"] = stranger.pid  # as if the PID had been recycled by an unrelated process
        path.write_text(json.dumps(doc))
        await daemon.start()
        assert records(tmp_path) == []
        assert stranger.poll() is None, "an unrelated process was killed"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await daemon.stub.Stop(pb.StopRequest(computation_id="victim"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stranger.kill()
        stranger.wait()


async def test_vm_still_starting_at_crash_is_killed(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "FAKE_QEMU_MODE": "no-qmp", "MANAGER_QEMU_START_TIMEOUT": "60s"}
    d = Daemon(env=env, log=tmp_path / "daemon.log")
    await d.start()
    call = asyncio.ensure_future(d.stub.Run(run_request("half")))
    await wait_for(lambda: recorded_pids(tmp_path), "QEMU to start")
    (pid,) = recorded_pids(tmp_path)
    await d.kill()
    with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
        await call
    assert alive(pid)
    d.env.pop("FAKE_QEMU_MODE")
    await d.start()
    await wait_until_gone(pid)
    assert records(tmp_path) == [] and vm_files(tmp_path) == []
    await d.terminate()


async def test_sigterm_can_leave_vms_for_the_next_start(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    d = Daemon(env=env, log=tmp_path / "daemon.log")
    await d.start()
    response = await d.stub.Run(run_request("upgrade"))
    pid = pid_of(tmp_path, "upgrade")
    assert await d.terminate() == 0
    assert alive(pid)
    await d.start()
    events = d.stub.Events(pb.EventsRequest(computation_id="upgrade"))
    await subscribed(events)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await d.stub.Run(run_request("upgrade"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await d.stub.Stop(pb.StopRequest(computation_id="upgrade"))
    await wait_until_gone(pid)
    statuses = []
    async for message in events:
        statuses.append((message.agent_event.event_type, message.agent_event.status))
        if statuses[-1] == ("vm-stop", "complete"):
            break
    assert ("vm-stop", "starting") in statuses
    assert records(tmp_path) == [] and vm_files(tmp_path) == []
    assert int(response.agent_port) > 0
    d.env["MANAGER_SHUTDOWN_STOPS_VMS"] = "true"
    await d.terminate()


async def test_default_sigterm_stops_every_vm(daemon: Daemon, tmp_path: Path) -> None:
    await daemon.stub.Run(run_request("x1"))
    await daemon.stub.Run(run_request("x2"))
    pids = [pid_of(tmp_path, "x1"), pid_of(tmp_path, "x2")]
    assert await daemon.terminate() == 0
    for pid in pids:
        assert not alive(pid)
    assert records(tmp_path) == [] and vm_files(tmp_path) == []


U = "0b7b3f0e-2f4c-4c1e-9b64-1f0a3c2d4e5f"


def test_record_round_trip(tmp_path: Path) -> None:
    from cocos_manager.host.state_store import StateStore

    store = StateStore(tmp_path / "s")
    store.open()
    record = VmRecord(
        "c", U, "running", 1, 3, 3, pid=4, start_time=5, argv=["q"], files={"k": "/f"}
    )
    store.save(record)
    (tmp_path / "s" / "vm-broken.json").write_text("{not json")
    assert store.load_all() == [record]
    assert (tmp_path / "s" / "vm-broken.bad").exists()
    store.remove(U)
    assert store.load_all() == []


def test_newest_readable_version_wins_after_a_crash(tmp_path: Path) -> None:
    from cocos_manager.host.state_store import StateStore

    store = StateStore(tmp_path / "s")
    store.open()
    record = VmRecord("c", U, "starting", 1, 3, 3)
    store.save(record)
    record.state = "running"
    store.save(record)
    assert store.flush()  # version 1 is unlinked once version 2 is on the disk
    assert [p.name for p in (tmp_path / "s").iterdir()] == [f"vm-{U}.2.json"]
    (tmp_path / "s" / f"vm-{U}.3.json").write_text('{"half')  # a crash writing version 3
    fresh = StateStore(tmp_path / "s")
    assert fresh.load_all() == [record]
    fresh.remove(U)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"vm-{U}.3.bad"]


# -- the branches of adoption -------------------------------------------------------------------


async def test_a_live_qemu_whose_qmp_does_not_answer_is_killed_and_cleaned(
    tmp_path: Path,
) -> None:
    """A wedged QEMU (alive, its monitor never answers again) is not adopted: the probe gives
    up after MANAGER_QEMU_ADOPT_TIMEOUT and the VM is killed rather than left untracked."""
    env = {**base_env(tmp_path), "FAKE_QEMU_MODE": "qmp-once", "MANAGER_QEMU_ADOPT_TIMEOUT": "2s"}
    d = Daemon(env=env, log=tmp_path / "daemon.log")
    await d.start()
    await d.stub.Run(run_request("wedged"))  # readiness was its one QMP session
    pid = pid_of(tmp_path, "wedged")
    await d.kill()
    assert alive(pid)
    await d.start()  # SERVING only after recovery
    await wait_until_gone(pid)
    assert records(tmp_path) == [] and vm_files(tmp_path) == []
    assert "its QMP monitor does not answer" in d.log.read_text()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await d.stub.Stop(pb.StopRequest(computation_id="wedged"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await d.stub.Run(run_request("wedged"))  # its id, port and CID are free again
    await d.terminate()


async def test_same_start_time_but_another_command_line_is_never_signalled(
    daemon: Daemon, tmp_path: Path
) -> None:
    """PID and start time match, the command line does not: not provably ours, so it is
    neither adopted nor signalled; its record and files stay for the operator (the error line
    naming it: tests/vm/test_readoption.py)."""
    await daemon.stub.Run(run_request("edited"))
    pid = pid_of(tmp_path, "edited")
    await daemon.kill()
    path = newest_record_path(tmp_path / "state")
    doc = json.loads(path.read_text())
    identity = process_identity(pid)
    assert identity is not None and doc["start_time"] == identity[0]  # the same process ...
    doc["cmdline"] = [*doc["cmdline"], "-name", "someone-else"]  # ... another command line
    path.write_text(json.dumps(doc))
    try:
        await daemon.start()
        assert [r["computation_id"] for r in records(tmp_path)] == ["edited"]
        assert len(vm_files(tmp_path)) == 6
        assert process_identity(pid) == identity, "a process not proven ours was signalled"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await daemon.stub.Stop(pb.StopRequest(computation_id="edited"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await wait_until_gone(pid)


async def test_readopted_vm_is_announced_keeps_its_cid_and_hears_its_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon dies; the next one (here in-process, with its production wiring) adopts the
    VM: a `readopted` provision event, the CID map restored (an agent on the VM's CID speaks
    for it again), and Stop drops the agent's connection."""
    first = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await first.start()
    await first.stub.Run(run_request("kept"))
    pid = pid_of(tmp_path, "kept")
    (record,) = records(tmp_path)
    cid = int(str(record["guest_cid"]))
    await first.kill()

    for name, value in {**base_env(tmp_path), "MANAGER_QEMU_AGENT_CHANNEL": "vsock"}.items():
        monkeypatch.setenv(name, value)
    provider, _ = tracer_provider()
    runner = DaemonRunner(load_settings(), shutdown_grace=1, tracer_provider=provider)
    watch = runner.bus.subscribe()  # before recovery: the adoption is published during it
    try:
        await runner.setup()
        await runner.start()
        service, agents = runner.service, runner.agents
        assert service is not None and agents is not None
        adopted = await next_event(watch)
        assert (adopted.event_type, adopted.status) == ("vm-provision", "complete")
        details = json.loads(adopted.details)
        assert details["readopted"] is True and details["pid"] == pid
        assert details["guest_cid"] == cid and adopted.computation_id == "kept"
        assert service.computation_for_cid(cid) == "kept" and cid in service._cids.held
        assert METRICS.registry.get_sample_value("manager_vms_running") == 1

        before = METRICS.registry.get_sample_value("manager_agent_messages_total") or 0.0
        ours, theirs = socket.socketpair()
        connection = asyncio.ensure_future(
            agents.serve(*await asyncio.open_connection(sock=ours), cid)
        )
        reader, writer = await asyncio.open_connection(sock=theirs)
        body = pb.ClientStreamMessage(
            agent_log=pb.AgentLog(message="after the restart", computation_id="forged")
        ).SerializeToString()
        writer.write(struct.pack("<II", 1, len(body)) + body)
        assert await asyncio.wait_for(reader.readexactly(4), GUARD) == struct.pack("<I", 1)
        heard = await asyncio.wait_for(anext(aiter(watch)), GUARD)
        assert heard.agent_log.message == "after the restart"
        assert heard.agent_log.computation_id == "kept"
        after = METRICS.registry.get_sample_value("manager_agent_messages_total") or 0.0
        assert after - before == 1

        await service.stop("kept")
        await asyncio.wait([connection], timeout=GUARD)
        assert connection.cancelled() and await asyncio.wait_for(reader.read(), GUARD) == b""
        assert service.computation_for_cid(cid) is None
        assert METRICS.registry.get_sample_value("manager_vms_running") == 0
        writer.close()
    finally:
        await runner.cleanup()
    await wait_until_gone(pid)
    assert records(tmp_path) == [] and vm_files(tmp_path) == []


_STREAMS: dict[int, AsyncIterator[pb.ClientStreamMessage]] = {}


async def next_event(subscription: Subscription) -> pb.AgentEvent:
    """The next manager event a subscription holds (console lines skipped)."""
    stream = _STREAMS.setdefault(id(subscription), aiter(subscription))
    while True:
        message = await asyncio.wait_for(anext(stream), GUARD)
        if message.HasField("agent_event"):
            return message.agent_event
