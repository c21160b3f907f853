"""The observable contracts of the real daemon wiring (DaemonRunner, as `running_manager` runs
it): the metrics the service records, the spans it opens under each RPC's server span, Events
filtering, and the vsock agent channel through the daemon's own listener. Each test has a
positive control, so a contract that silently stopped working (nothing counted, nothing
delivered) fails rather than passes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan

from cocos_manager.agent.vsock import AgentEventListener, Connect
from cocos_manager.events import bus as events_module
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry.metrics import METRICS, RUN_FAILURE_REASONS
from tests.support.harness import Manager, run_request, running_manager
from tests.support.harness import test_tracer_provider as tracer_provider
from tests.support.processes import children
from tests.support.waiting import GUARD, subscribed, wait_for

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

# -- metrics -----------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    value = METRICS.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def failures() -> dict[str, float]:
    return {
        reason: sample("manager_run_failures_total", reason=reason)
        for reason in RUN_FAILURE_REASONS
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in before if after[key] != before[key]}


async def _bad_request(m: Manager) -> None:
    request = run_request("bad")
    request.ClearField("algorithm")
    await m.stub.Run(request)


async def _over_the_limit(m: Manager) -> None:
    await m.stub.Run(run_request("first"))
    try:
        await m.stub.Run(run_request("second"))
    finally:
        await m.stub.Stop(pb.StopRequest(computation_id="first"))


async def _cancelled(m: Manager) -> None:
    call = m.stub.Run(run_request("cancelled"))
    await wait_for(children, "QEMU to start")
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    await wait_for(lambda: not m.service.computations(), "the release")
    raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata())


# reason -> (settings, how to fail a Run, the status the client gets)
FAILURES: dict[str, tuple[dict[str, str], Callable[[Manager], object], grpc.StatusCode]] = {
    "invalid_argument": ({}, _bad_request, grpc.StatusCode.INVALID_ARGUMENT),
    "resource_exhausted": (
        {"MANAGER_MAX_VMS": "1"},
        _over_the_limit,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "files": (
        {"MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": "/nonexistent/rootfs.cpio.gz"},
        lambda m: m.stub.Run(run_request("imageless")),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "qemu_exited": (
        {"FAKE_QEMU_MODE": "fail"},
        lambda m: m.stub.Run(run_request("exits")),
        grpc.StatusCode.INTERNAL,
    ),
    "start_timeout": (
        {"FAKE_QEMU_MODE": "no-qmp", "MANAGER_QEMU_START_TIMEOUT": "300ms"},
        lambda m: m.stub.Run(run_request("silent")),
        grpc.StatusCode.INTERNAL,
    ),
    "cancelled": ({"FAKE_QEMU_MODE": "no-qmp"}, _cancelled, grpc.StatusCode.CANCELLED),
}


@pytest.mark.parametrize("reason", sorted(FAILURES))
async def test_each_run_failure_is_counted_under_its_own_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reason: str
) -> None:
    env, fail, code = FAILURES[reason]
    async with running_manager(tmp_path, monkeypatch, **env) as m:
        before = failures()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fail(m)  # type: ignore[misc]
        assert info.value.code() == code
        assert delta(before, failures()) == {reason: 1}
        assert sample("manager_vms_running") == 0
        assert m.service.computations() == {} and children() == []


async def test_vms_running_follows_run_stop_and_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        assert sample("manager_vms_running") == 0
        await m.stub.Run(run_request("a"))
        assert sample("manager_vms_running") == 1
        await m.stub.Run(run_request("b"))
        assert sample("manager_vms_running") == 2
        await m.stub.Stop(pb.StopRequest(computation_id="a"))
        assert sample("manager_vms_running") == 1
        # Long enough to be counted before it ends: 0.2 s from its spawn raced the Run's
        # answer on a loaded host.
        monkeypatch.setenv("FAKE_QEMU_MODE", "exit-after:1.5:0")
        await m.stub.Run(run_request("brief"))
        assert sample("manager_vms_running") == 2
        await wait_for(lambda: "brief" not in m.service.computations(), "the VM's own exit")
        assert sample("manager_vms_running") == 1
        before = failures()
        await m.stub.Stop(pb.StopRequest(computation_id="b"))
        assert sample("manager_vms_running") == 0
        assert delta(before, failures()) == {}  # ending a VM is not a failed Run


# -- the vsock channel: a stand-in agent per guest CID -------------------------------------------


@dataclass
class StandInAgents:
    """Agents listening for the manifest on a UNIX socket per guest CID (this host has no
    vhost-vsock), and connecting back to the daemon's own agent listener over socketpairs."""

    root: Path
    manifests: dict[int, bytes] = field(default_factory=dict)
    servers: list[asyncio.Server] = field(default_factory=list)
    connections: list[tuple[asyncio.Task[int], Streams]] = field(default_factory=list)

    def connector(self, cid: int) -> Connect:
        async def connect() -> Streams:
            return await asyncio.open_unix_connection(str(self.root / f"agent-{cid}.sock"))

        return connect

    async def listen(self, cid: int) -> None:
        async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.manifests[cid] = await reader.read()
            writer.close()

        self.servers.append(
            await asyncio.start_unix_server(take, str(self.root / f"agent-{cid}.sock"))
        )

    async def connect_back(
        self, listener: AgentEventListener, cid: int
    ) -> tuple[asyncio.Task[int], Streams]:
        ours, theirs = socket.socketpair()
        manager_side = await asyncio.open_connection(sock=ours)
        agent_side = await asyncio.open_connection(sock=theirs)
        task = asyncio.ensure_future(listener.serve(*manager_side, cid))
        self.connections.append((task, agent_side))
        return task, agent_side

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()
        for task, (_, writer) in self.connections:
            task.cancel()
            writer.close()
        await asyncio.gather(*(task for task, _ in self.connections), return_exceptions=True)


@contextlib.asynccontextmanager
async def vsock_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str
) -> AsyncIterator[tuple[Manager, StandInAgents, AgentEventListener]]:
    agents = StandInAgents(tmp_path)
    try:
        async with running_manager(tmp_path, monkeypatch, agent_connector=agents.connector,
                                   MANAGER_QEMU_AGENT_CHANNEL="vsock", **env) as m:  # fmt: skip
            listener = m.runner.agents
            assert listener is not None, "the daemon wires an agent listener on the vsock channel"
            yield m, agents, listener
    finally:
        await agents.close()


def frame(message_id: int, text: str, claimed_id: str = "") -> bytes:
    body = pb.ClientStreamMessage(
        agent_log=pb.AgentLog(message=text, computation_id=claimed_id, level="info-agent")
    ).SerializeToString()
    return struct.pack("<II", message_id, len(body)) + body


def acks(*ids: int) -> bytes:
    return b"".join(struct.pack("<I", i) for i in ids)


# -- spans -------------------------------------------------------------------------------------

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
TRACEPARENT = (("traceparent", f"00-{TRACE_ID:032x}-{CALLER_SPAN:016x}-01"),)


def spans_of_trace() -> list[ReadableSpan]:
    _, exporter = tracer_provider()
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == TRACE_ID]


def children_of(spans: list[ReadableSpan], parent: ReadableSpan) -> list[str]:
    return [
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


async def test_run_and_stop_spans_are_children_of_the_rpc_span_in_the_callers_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with vsock_manager(tmp_path, monkeypatch) as (m, agents, _):
        _, exporter = tracer_provider()
        exporter.clear()
        await agents.listen(3)
        await m.stub.Run(run_request("traced"), metadata=TRACEPARENT)
        await m.stub.Stop(pb.StopRequest(computation_id="traced"), metadata=TRACEPARENT)
        assert json.loads(agents.manifests[3])["id"] == "traced"  # the hand-over happened

    spans = spans_of_trace()
    by_name = {s.name: s for s in spans}
    run, stop = by_name["manager.ManagerService/Run"], by_name["manager.ManagerService/Stop"]
    for server in (run, stop):
        assert server.parent is not None and server.parent.span_id == CALLER_SPAN
        assert server.parent.is_remote
    assert children_of(spans, run) == ["validate", "prepare-files", "start-qemu", "handover"]
    assert children_of(spans, stop) == ["stop"]
    for name in ("validate", "prepare-files", "start-qemu", "handover", "stop"):
        child = by_name[name]
        assert child.start_time is not None and child.end_time is not None
        parent = stop if name == "stop" else run
        assert parent.start_time is not None and parent.end_time is not None
        assert parent.start_time <= child.start_time <= child.end_time <= parent.end_time
    assert by_name["start-qemu"].attributes is not None
    assert int(str(by_name["start-qemu"].attributes["qemu.pid"])) > 0


async def test_a_failed_run_still_parents_its_spans_under_the_rpc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_MODE="fail") as m:
        _, exporter = tracer_provider()
        exporter.clear()
        with pytest.raises(grpc.aio.AioRpcError):
            await m.stub.Run(run_request("broken"), metadata=TRACEPARENT)
    spans = spans_of_trace()
    (run,) = [s for s in spans if s.name == "manager.ManagerService/Run"]
    assert children_of(spans, run) == ["validate", "prepare-files", "start-qemu"]
    assert not run.status.is_ok


# -- Events filtering --------------------------------------------------------------------------


@dataclass
class Stream:
    """One Events call read in the background into `seen` as (computation, type, status)."""

    call: grpc.aio.UnaryStreamCall[pb.EventsRequest, pb.ClientStreamMessage]
    seen: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for message in self.call:
                if message.HasField("agent_event"):
                    e = message.agent_event
                    self.seen.append((e.computation_id, e.event_type, e.status))
                else:
                    self.seen.append((message.agent_log.computation_id, "log", ""))

    def computations(self) -> set[str]:
        return {computation for computation, _, _ in self.seen}

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def test_events_filter_by_computation_with_two_running_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        streams = {
            name: Stream(m.stub.Events(pb.EventsRequest(computation_id=name)))
            for name in ("a", "b", "")
        }
        for stream in streams.values():
            await subscribed(stream.call)
        await asyncio.gather(m.stub.Run(run_request("a")), m.stub.Run(run_request("b")))
        await m.stub.Stop(pb.StopRequest(computation_id="b"))
        await m.stub.Stop(pb.StopRequest(computation_id="a"))
        # a's Stop is published last: whatever of b's could have reached a's stream is before it.
        a_done, b_done = ("a", "vm-stop", "complete"), ("b", "vm-stop", "complete")
        await wait_for(lambda: a_done in streams["a"].seen, "a's own events")
        await wait_for(lambda: b_done in streams["b"].seen, "b's own events")
        await wait_for(lambda: a_done in streams[""].seen, "everything, unfiltered")
        for name in ("a", "b"):
            assert streams[name].computations() == {name}
            # Subscribed (headers received) before the Run: its very first event is there.
            assert streams[name].seen[0] == (name, "vm-provision", "starting")
            assert (name, "vm-provision", "complete") in streams[name].seen
            assert ("log", "") in {(kind, status) for _, kind, status in streams[name].seen}
        assert streams[""].computations() == {"a", "b"}
        assert b_done in streams[""].seen
        # The unfiltered stream has exactly the union of the two filtered ones.
        assert sorted(streams[""].seen) == sorted(streams["a"].seen + streams["b"].seen)
        for stream in streams.values():
            stream.close()
        # A cancelled Events call leaves no subscription behind.
        await wait_for(lambda: m.service.bus.subscriber_count == 0, "the unsubscriptions")


# -- the vsock channel through the daemon -------------------------------------------------------


async def test_agent_messages_reach_events_stamped_counted_and_acked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with vsock_manager(tmp_path, monkeypatch) as (m, agents, listener):
        await agents.listen(3)
        await agents.listen(4)
        await m.stub.Run(run_request("mine"))
        await m.stub.Run(run_request("other"))
        cids = {c: m.service.computations()[c].resources.guest_cid for c in ("mine", "other")}
        assert cids == {"mine": 3, "other": 4}
        mine = Stream(m.stub.Events(pb.EventsRequest(computation_id="mine")))
        await subscribed(mine.call)
        before = sample("manager_agent_messages_total")

        task, (reader, writer) = await agents.connect_back(listener, cids["mine"])
        writer.write(frame(1, "hello") + frame(2, "I am other", claimed_id="other"))
        assert await asyncio.wait_for(reader.readexactly(8), GUARD) == acks(1, 2)
        await wait_for(lambda: len(mine.seen) >= 2, "the agent's messages on Events")
        assert mine.seen == [("mine", "log", ""), ("mine", "log", "")]  # stamped by CID
        assert sample("manager_agent_messages_total") - before == 2

        # Stop releases the CID: the agent's connection is dropped, the agent reads EOF.
        assert listener.connections == 1
        await m.stub.Stop(pb.StopRequest(computation_id="mine"))
        await asyncio.wait([task], timeout=GUARD)
        assert task.cancelled()
        assert await asyncio.wait_for(reader.read(), GUARD) == b""
        assert listener.connections == 0 and m.service.computation_for_cid(3) is None
        await m.stub.Stop(pb.StopRequest(computation_id="other"))
        mine.close()


async def test_agent_is_paced_by_a_subscriber_that_reads_and_nothing_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our reader pauses on purpose: it must not be taken for one that stopped reading.
    env = {"MANAGER_EVENTS_HOLD_TIMEOUT": "60s"}
    async with vsock_manager(tmp_path, monkeypatch, **env) as (m, agents, listener):
        await agents.listen(3)
        await m.stub.Run(run_request("burst"))
        # The stand-in QEMU's console line first, so that the queue holds the agent's alone.
        console = m.service.console("burst")
        await wait_for(lambda: any("BOOTED" in line.text for line in console.tail()), "BOOTED")
        subscription = m.service.subscribe("burst")
        size = events_module.DEFAULT_QUEUE_SIZE
        count = size  # twice what holds an agent back (half the queue)
        dropped_before = sample("manager_events_dropped_total")

        task, (reader, writer) = await agents.connect_back(listener, 3)
        writer.write(b"".join(frame(i + 1, f"m{i}") for i in range(count)))
        writer.write_eof()
        await wait_for(lambda: subscription.qsize() > size // 2, "the backlog")
        for _ in range(20):  # the agent is held: its connection makes no progress
            await asyncio.sleep(0)
        assert not task.done()
        assert subscription.qsize() <= size // 2 + 1
        received = []
        async for message in subscription:
            if message.HasField("agent_log") and message.agent_log.message.startswith("m"):
                received.append(message.agent_log.message)
            if len(received) == count:
                break
        assert received == [f"m{i}" for i in range(count)]
        assert await asyncio.wait_for(task, GUARD) == count
        assert await asyncio.wait_for(reader.read(), GUARD) == acks(*range(1, count + 1))
        assert sample("manager_events_dropped_total") == dropped_before
        await m.stub.Stop(pb.StopRequest(computation_id="burst"))


async def test_a_subscriber_that_stopped_reading_loses_messages_and_they_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"MANAGER_EVENTS_HOLD_TIMEOUT": "50ms"}
    async with vsock_manager(tmp_path, monkeypatch, **env) as (m, agents, listener):
        await agents.listen(3)
        await m.stub.Run(run_request("flood"))
        stalled = m.service.subscribe("flood")  # never read
        size = events_module.DEFAULT_QUEUE_SIZE
        dropped_before = sample("manager_events_dropped_total"), m.service.bus.dropped
        extra = 25
        task, (_, writer) = await agents.connect_back(listener, 3)
        writer.write(b"".join(frame(i + 1, f"m{i}") for i in range(size + extra)))
        writer.write_eof()
        assert await asyncio.wait_for(task, GUARD) == size + extra  # not held back forever
        assert stalled.qsize() == size
        counted = sample("manager_events_dropped_total") - dropped_before[0]
        # Every message it lost, the agent's and any console line of QEMU's meanwhile.
        assert counted == m.service.bus.dropped - dropped_before[1] >= extra
        await m.stub.Stop(pb.StopRequest(computation_id="flood"))
