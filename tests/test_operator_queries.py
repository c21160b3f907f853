"""List, Logs and TTL validation through a real grpc.aio server with the stand-in QEMU."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cocos_manager.events.messages import log_message
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry.metrics import Metrics, start_metrics_server
from cocos_manager.telemetry.vm_metrics import register_vm_metrics, unregister_vm_metrics
from tests.api.test_grpcurl import grpcurl
from tests.support.daemon_process import Daemon
from tests.support.harness import VNC_BASE, Manager, base_env, run_request, running_manager
from tests.support.processes import processes_mentioning
from tests.support.waiting import subscribed

WAIT = 20.0


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Manager]:
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_STOP_TIMEOUT="2s") as m:
        yield m


async def listed(m: Manager) -> dict[str, pb.ComputationInfo]:
    response = await m.stub.List(pb.ListRequest(), timeout=5)
    return {c.computation_id: c for c in response.computations}


async def until(check: Callable[[], object], what: str) -> None:
    """Waits for a condition of the manager's state that nothing signals to a client."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def logs(m: Manager, computation_id: str, tail: int = 0) -> list[pb.AgentLog]:
    request = pb.LogsRequest(computation_id=computation_id, tail=tail)
    return [line async for line in m.stub.Logs(request, timeout=5)]


async def follow_until(stream: AsyncIterator[pb.AgentLog], text: str) -> list[pb.AgentLog]:
    seen = []
    async for line in stream:
        seen.append(line)
        if text in line.message:
            return seen
    raise AssertionError(f"stream ended before {text!r}: {[s.message for s in seen]}")


async def test_list_shows_starting_running_and_stopping_vms(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await listed(manager) == {}
    before = time.time()
    response = await manager.stub.Run(run_request("run-1"), timeout=WAIT)
    info = (await listed(manager))["run-1"]
    computation = manager.service.computations()["run-1"]
    assert computation.process is not None
    assert info.state == "running"
    assert info.agent_port == response.agent_port
    assert info.guest_cid == 0  # the harness's VMs are on fw_cfg: no vsock device, no CID
    assert info.vnc_display == computation.resources.vnc_display == VNC_BASE
    assert info.pid == computation.process.pid
    assert before - 1 <= info.started_at.ToMilliseconds() / 1000 <= time.time()
    assert not info.HasField("expires_at")  # no TTL
    assert info.adopted is False

    # A VM whose QEMU never answers stays "starting" until it is stopped.
    monkeypatch.setenv("FAKE_QEMU_MODE", "no-qmp")
    starting = asyncio.ensure_future(manager.stub.Run(run_request("run-2"), timeout=WAIT))
    await until(lambda: "run-2" in manager.service.computations(), "run-2 admitted")
    infos = await listed(manager)
    assert list(infos) == ["run-1", "run-2"]  # sorted by id
    assert infos["run-2"].state == "starting"
    await manager.stub.Stop(pb.StopRequest(computation_id="run-2"), timeout=WAIT)
    with pytest.raises(grpc.aio.AioRpcError) as aborted:
        await starting
    assert aborted.value.code() is grpc.StatusCode.ABORTED

    # One that ignores SIGTERM is "stopping" until STOP_TIMEOUT (2 s) has it killed.
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-term")
    await manager.stub.Run(run_request("run-3"), timeout=WAIT)
    stopping = asyncio.ensure_future(
        manager.stub.Stop(pb.StopRequest(computation_id="run-3"), timeout=WAIT)
    )
    await until(
        lambda: manager.service.computations()["run-3"].state.value == "stopping", "stopping"
    )
    assert (await listed(manager))["run-3"].state == "stopping"
    await stopping
    assert list(await listed(manager)) == ["run-1"]


async def test_logs_of_a_running_vm_tail_and_follow_to_its_end(manager: Manager) -> None:
    await manager.stub.Run(run_request("logs-1"), timeout=WAIT)
    stream = manager.stub.Logs(pb.LogsRequest(computation_id="logs-1", follow=True))
    first = await asyncio.wait_for(follow_until(stream, "BOOTED logs-1"), WAIT)
    assert first[-1].message == "BOOTED logs-1"  # terminal escapes stripped
    assert first[-1].level == "info" and first[-1].computation_id == "logs-1"

    manager.service.publish_agent_message(log_message("logs-1", "debug", "agent: computing"))
    agent = await asyncio.wait_for(follow_until(stream, "agent: computing"), WAIT)
    assert agent[-1].level == "debug"

    await manager.stub.Stop(pb.StopRequest(computation_id="logs-1"), timeout=WAIT)
    rest = [line async for line in stream]  # the stream ends with the VM
    assert any("terminating on signal 15" in line.message and line.level == "warn" for line in rest)

    # Post-mortem: readable after the end; tail gives the last lines.
    everything = [line.message for line in await logs(manager, "logs-1")]
    # From its boot on (an attempt that lost its port to another process first, and was
    # retried, left QEMU's words about it before).
    assert "BOOTED logs-1" in everything
    assert "agent: computing" in everything
    assert [line.message for line in await logs(manager, "logs-1", tail=1)] == everything[-1:]
    # Following an ended VM gives what is kept and ends.
    followed = manager.stub.Logs(pb.LogsRequest(computation_id="logs-1", follow=True))
    assert [line.message async for line in followed] == everything


async def test_logs_tell_why_a_vm_died(manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "exit-after:0.3:3")
    events = manager.stub.Events(pb.EventsRequest(computation_id="dies"))
    await subscribed(events)
    await manager.stub.Run(run_request("dies"), timeout=WAIT)
    async for message in events:
        if message.agent_event.event_type == "vm-exit":
            break
    events.cancel()
    assert "dies" not in await listed(manager)
    assert [line.message for line in await logs(manager, "dies")] == [
        "BOOTED dies",
        "reboot: Power down",
    ]


async def test_a_computation_run_again_shows_the_live_console(manager: Manager) -> None:
    await manager.stub.Run(run_request("again"), timeout=WAIT)
    manager.service.publish_agent_message(log_message("again", "info", "first run"))
    await manager.stub.Stop(pb.StopRequest(computation_id="again"), timeout=WAIT)
    assert "first run" in [line.message for line in await logs(manager, "again")]
    await manager.stub.Run(run_request("again"), timeout=WAIT)
    stream = manager.stub.Logs(pb.LogsRequest(computation_id="again", follow=True))
    lines = await asyncio.wait_for(follow_until(stream, "BOOTED again"), WAIT)
    console = manager.service.console("again")
    assert console.follower_count == 1
    stream.cancel()  # the client goes away: its follower goes too
    assert [line.message for line in lines] == ["BOOTED again"]
    await until(lambda: console.follower_count == 0, "the follower to be dropped")


async def test_logs_errors(manager: Manager) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await logs(manager, "nobody")
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert "nobody" in str(missing.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await logs(manager, "")
    assert empty.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "computation_id" in str(empty.value.details())


async def test_no_retained_consoles_when_told_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_LOG_RETAINED_VMS="0") as m:
        await m.stub.Run(run_request("gone"), timeout=WAIT)
        assert await logs(m, "gone") is not None  # live: readable
        await m.stub.Stop(pb.StopRequest(computation_id="gone"), timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await logs(m, "gone")
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("ttl", ["soon", "20", "0", "-20s", "20 s", "2562048h"])
async def test_a_bad_ttl_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ttl: str
) -> None:
    started = tmp_path / "qemu-starts.jsonl"
    async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_START_LOG=str(started)) as m:
        request = run_request("bad-ttl")
        request.ttl = ttl
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await m.stub.Run(request, timeout=WAIT)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert str(raised.value.details()).startswith("ttl: ")
        assert await listed(m) == {}
        assert not started.exists()  # QEMU was never started
        assert processes_mentioning(str(tmp_path)) == []
        assert not list((tmp_path / "state").glob("vm-*"))  # no VM record
        assert not (tmp_path / "vms").exists() or not list((tmp_path / "vms").iterdir())
        # And the same id runs with a good TTL (nothing of the refused Run is in the way).
        request.ttl = "1h"
        await m.stub.Run(request, timeout=WAIT)
        assert list(await listed(m)) == ["bad-ttl"]


async def test_list_and_logs_through_grpcurl(manager: Manager) -> None:
    await manager.stub.Run(run_request("curl-1"), timeout=WAIT)
    stream = manager.stub.Logs(pb.LogsRequest(computation_id="curl-1", follow=True))
    await asyncio.wait_for(follow_until(stream, "BOOTED curl-1"), WAIT)
    stream.cancel()
    code, out, err = await grpcurl(
        "-plaintext", "-d", "{}", manager.address, "manager.ManagerService/List"
    )
    assert code == 0, err
    (info,) = json.loads(out)["computations"]
    assert info["computation_id"] == "curl-1" and info["state"] == "running"
    assert "started_at" in info and "expires_at" not in info
    code, out, err = await grpcurl(
        "-plaintext", "-d", json.dumps({"computation_id": "curl-1", "tail": 1}),
        manager.address, "manager.ManagerService/Logs",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["message"] == "BOOTED curl-1"


async def test_a_vm_adopted_after_a_daemon_restart_is_listed_as_adopted(tmp_path: Path) -> None:
    daemon = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        before = time.time()
        await daemon.stub.Run(run_request("kept"), timeout=WAIT)
        (first,) = (await daemon.stub.List(pb.ListRequest(), timeout=5)).computations
        assert first.adopted is False
        await daemon.kill()  # SIGKILL: the VM outlives the daemon
        await daemon.start()
        (info,) = (await daemon.stub.List(pb.ListRequest(), timeout=5)).computations
        assert info.computation_id == "kept" and info.state == "running"
        assert info.adopted is True
        assert info.pid == first.pid
        assert (info.agent_port, info.guest_cid) == (first.agent_port, first.guest_cid)
        # When its QEMU started (btime is whole seconds), not when it was adopted.
        started = info.started_at.ToMilliseconds() / 1000
        assert before - 1.5 <= started <= first.started_at.ToMilliseconds() / 1000 + 1.5
        # Its console is there, with what QEMU printed before the restart.
        stream = daemon.stub.Logs(pb.LogsRequest(computation_id="kept"), timeout=5)
        assert [line.message async for line in stream] == ["BOOTED kept"]
        await daemon.stub.Stop(pb.StopRequest(computation_id="kept"), timeout=WAIT)
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()


async def test_per_vm_metrics_of_the_running_vms(manager: Manager) -> None:
    metrics = Metrics()
    collector = register_vm_metrics(manager.service.vm_pids, metrics.registry)
    server = await start_metrics_server(0, "127.0.0.1", metrics)
    assert server is not None

    def scrape() -> set[tuple[str, str]]:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, sample.labels["computation_id"])
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if family.name.startswith("manager_vm_")
        }

    try:
        await manager.stub.Run(run_request("measured"), timeout=WAIT)
        assert await asyncio.to_thread(scrape) == {
            ("manager_vm_cpu_seconds_total", "measured"),
            ("manager_vm_resident_memory_bytes", "measured"),
        }
        await manager.stub.Stop(pb.StopRequest(computation_id="measured"), timeout=WAIT)
        assert await asyncio.to_thread(scrape) == set()  # gone with the VM
    finally:
        await server.close()
        unregister_vm_metrics(collector, metrics.registry)
