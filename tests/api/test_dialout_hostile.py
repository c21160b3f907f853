"""The dial-out against a computations server that breaks the contract (docs/contracts.md, "The
dial-out stream"): bytes that are no `ComputationRunReq`, a flood of invalid requests from a
server that reads nothing. The daemon is the real process; the server is a raw gRPC handler
made here (tests/support/raw_computations_server.py) that sends whatever bytes it is given.

Before these tests one truncated message (`0a 05 61 62`) killed the dial-out's task: never
reconnected, health and the gauge still said connected, and SIGTERM ended in a traceback with
exit status 1; and a flood of invalid requests grew the outgoing buffer without bound.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cocos_manager.api.dialout import HEALTH_SERVICE
from cocos_manager.api.dialout_buffer import OutgoingBuffer
from cocos_manager.api.dialout_requests import Complaints
from cocos_manager.api.dialout_runs import RunRequests
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry import get_logger
from cocos_manager.telemetry.metrics import Metrics
from tests.api.test_dialout import dialing_manager
from tests.support.daemon_process import Daemon
from tests.support.harness import Manager, base_env, run_request, running_manager
from tests.support.raw_computations_server import RawComputationsServer

WAIT = 30.0
TRUNCATED = bytes.fromhex("0a056162")  # field 1, length 5, then only 2 bytes: no message


def metrics(port: int) -> dict[str, float]:
    """The daemon's /metrics, as {series: value} (labels kept in the name)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def log_records(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in daemon.log.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]


async def dialout_health(daemon: Daemon) -> int:
    stub = health_pb2_grpc.HealthStub(daemon.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=5)
    return int(reply.status)


async def until(condition: Any, what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


def dialing_daemon(tmp_path: Path, url: str, **env: str) -> Daemon:
    """Its /metrics on a port of its own pick (a port picked free here and let go could be
    taken before the daemon binds it): `metrics_port` says which, once it runs."""
    return Daemon(
        env={**base_env(tmp_path), "MANAGER_GRPC_URL": url, "MANAGER_METRICS_PORT": "0", **env},
        log=tmp_path / "daemon.log",
    )


def metrics_port(daemon: Daemon) -> int:
    (port,) = [port for port in daemon.listening_ports() if port != daemon.port]
    return port


async def test_an_undecodable_request_is_logged_once_and_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    server = RawComputationsServer()
    await server.start()
    daemon = dialing_daemon(tmp_path, server.url)
    await daemon.start()
    try:
        await server.wait_for(lambda: server.connections == 1, "the daemon's stream")
        # An id, then a field cut short: the request can be answered by its id.
        with_id = run_request("cut-short").SerializeToString()[:40]
        server.push(TRUNCATED, with_id, run_request("after-garbage").SerializeToString())
        await server.wait_for(lambda: server.run_res("after-garbage"), "run_res after the garbage")
        failed = server.events("cut-short", "vm-provision", "failed")
        assert len(failed) == 1, server.received
        details = json.loads(failed[0].details)
        assert details["code"] == "INVALID_ARGUMENT"
        assert "40 bytes" in details["error"]
        assert server.connections == 1, "the stream should go on"

        said = [r for r in log_records(daemon) if r["message"].startswith("dial-out: undecodable")]
        assert [r.get("size") for r in said] == [4, 40], said
        assert await dialout_health(daemon) == health_pb2.HealthCheckResponse.SERVING
        values = metrics(metrics_port(daemon))
        assert values['manager_dialout_requests_total{outcome="undecodable"}'] == 2
        assert values["manager_dialout_connected"] == 1

        # Health and the gauge say what is true: the server goes, then comes back.
        await server.stop()

        async def down() -> bool:
            return (
                await dialout_health(daemon) == health_pb2.HealthCheckResponse.NOT_SERVING
                and metrics(metrics_port(daemon))["manager_dialout_connected"] == 0
            )

        await until(down, "health NOT_SERVING and the gauge 0 with the server gone")
        await server.start()
        server.push(run_request("after-restart").SerializeToString())
        await server.wait_for(lambda: server.run_res("after-restart"), "run_res after restart")
        assert await dialout_health(daemon) == health_pb2.HealthCheckResponse.SERVING
    finally:
        status = await daemon.terminate()
        await server.stop()
    assert status == 0, daemon.log_tail()
    assert "Traceback" not in daemon.log.read_text(), daemon.log_tail()


async def test_a_flood_of_invalid_requests_from_a_server_that_reads_nothing_is_bounded(
    tmp_path: Path,
) -> None:
    """Each invalid request is answered (a `vm-provision`/`failed` event): a server that sends
    requests and reads no answer must not make the daemon hold answers, tasks or log lines
    without bound. The dial-out reads a request only when it has room for its answer, and
    HTTP/2 flow control holds the server back meanwhile."""
    server = RawComputationsServer(reading=False)
    await server.start()
    daemon = dialing_daemon(tmp_path, server.url)
    await daemon.start()
    invalid = run_request("flood")
    invalid.ClearField("algorithm")
    flood = 200_000
    try:
        await server.wait_for(lambda: server.connections == 1, "the daemon's stream")
        server.push(*(invalid.SerializeToString() for _ in range(flood)))

        def taken(values: dict[str, float]) -> float:
            return values.get('manager_dialout_requests_total{outcome="failed"}', 0)

        # The daemon goes on taking requests as fast as their answers leave (the transport's
        # windows take some even from a server that reads nothing): bounded is not stopped.
        # Before, 40,000 requests taken left some 17,000 answers buffered and 80,000 log lines.
        buffered: list[float] = []

        async def took_many() -> bool:
            values = metrics(metrics_port(daemon))
            buffered.append(values["manager_dialout_buffered"])
            return taken(values) >= 40_000

        await until(took_many, "40,000 requests taken", timeout=240)
        assert max(buffered) <= 10_000, max(buffered)
        lines = [r for r in log_records(daemon) if r.get("computation_id") == "flood"]
        assert len(lines) < 200, f"{len(lines)} log lines about the flood"
        # The daemon still serves, and a Run from elsewhere is not held up.
        response = await daemon.stub.Run(run_request("local"), timeout=WAIT)
        assert response.computation_id == "local"
    finally:
        status = await daemon.terminate()
        await server.stop()
    assert status == 0, daemon.log_tail()


async def test_sigterm_after_garbage_ends_cleanly(tmp_path: Path) -> None:
    """Whatever a server sent, SIGTERM still ends in exit status 0 with the stream closed
    cleanly (before: a traceback and status 1, the rest of the clean-up skipped)."""
    server = RawComputationsServer()
    await server.start()
    daemon = dialing_daemon(tmp_path, server.url)
    await daemon.start()
    answered: AssertionError | None = None
    try:
        await server.wait_for(lambda: server.connections == 1, "the daemon's stream")
        server.push(TRUNCATED, TRUNCATED, pb.ComputationRunReq(id="x").SerializeToString())
        try:
            await server.wait_for(
                lambda: server.events("x", "vm-provision", "failed"), "the invalid request's answer"
            )
        except AssertionError as error:
            answered = error
    finally:
        status = await daemon.terminate()
        await server.stop()
    assert status == 0, daemon.log_tail()
    assert "Traceback" not in daemon.log.read_text(), daemon.log_tail()
    assert answered is None, str(answered)
    stopped = [r["message"] for r in log_records(daemon)][-1]
    assert stopped == "manager stopped", daemon.log_tail()


# -- in the test's loop: what cannot be provoked from outside --------------------------------


async def test_a_bug_while_reading_ends_the_session_and_the_stream_is_dialled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cocos_manager.api import dialout_runs as module

    server = RawComputationsServer()
    await server.start()
    real = module.decode_request
    calls: list[bytes] = []

    def broken_once(raw: bytes) -> object:
        calls.append(raw)
        if len(calls) == 1:
            raise RuntimeError("a bug in decoding")
        return real(raw)

    monkeypatch.setattr(module, "decode_request", broken_once)
    try:
        async with dialing_manager(tmp_path, monkeypatch, server.url) as (manager, dialout, m):
            await server.wait_for(lambda: server.connections == 1, "the first stream")
            server.push(run_request("lost-to-the-bug").SerializeToString())
            await server.wait_for(lambda: server.connections == 2, "the stream dialled again")
            assert "a bug in decoding" in dialout.last_error
            server.push(run_request("after-the-bug").SerializeToString())
            await server.wait_for(lambda: server.run_res("after-the-bug"), "run_res")
            assert dialout.connected and m.dialout_connected.value() == 1
            assert "after-the-bug" in manager.service.computations()
    finally:
        await server.stop()


async def test_a_burst_of_garbage_is_said_ten_times_then_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RawComputationsServer()
    await server.start()
    try:
        with capture_logs() as logs:
            async with dialing_manager(tmp_path, monkeypatch, server.url) as (_, dialout, m):
                await server.wait_for(lambda: server.connections == 1, "the stream")
                server.push(*(TRUNCATED for _ in range(500)))
                server.push(run_request("after-the-burst").SerializeToString())
                await server.wait_for(lambda: server.run_res("after-the-burst"), "run_res")
                undecodable = m.dialout_requests.labels(outcome="undecodable").value()
                assert undecodable == 500
                assert server.connections == 1 and dialout.connected
        said = [e for e in logs if e["event"].startswith("dial-out: undecodable")]
        assert [e.get("size") for e in said[:-1]] == [4] * 10, said
        assert said[-1]["count"] == 490, said[-1]  # the rest, in one line
    finally:
        await server.stop()


def test_the_buffer_holds_a_place_per_request_and_bounds_requests_in_number_and_bytes() -> None:
    from prometheus_client import CollectorRegistry

    from cocos_manager.api.dialout_buffer import OutgoingBuffer
    from cocos_manager.events.messages import log_message
    from cocos_manager.telemetry.metrics import Metrics

    buffer = OutgoingBuffer(
        4, 1 << 20, in_flight=2, in_flight_bytes=100, metrics=Metrics(CollectorRegistry())
    )
    buffer.request_read(10)
    assert buffer.offer(log_message("c", "info", "1"), connected=True)
    assert buffer.offer(log_message("c", "info", "2"), connected=True)
    assert buffer.offer(log_message("c", "info", "3"), connected=True)
    # Three messages and one place held for the request's answer: the fourth event is dropped.
    assert not buffer.offer(log_message("c", "info", "4"), connected=True)
    assert buffer.dropped_total == 1 and not buffer.has_room()
    buffer.push(log_message("c", "info", "answer"))
    buffer.request_done(10)
    assert len(buffer) == 4 and not buffer.has_room()  # the answer took the held place
    while len(buffer):
        buffer.sent(buffer._messages[0][0])
    assert buffer.has_room()
    buffer.request_read(150)  # one large request: no more until it ends
    assert not buffer.has_room()
    buffer.request_done(150)
    buffer.request_read(1)
    buffer.request_read(1)
    assert not buffer.has_room()  # two in flight


def test_an_id_is_salvaged_only_from_complete_bytes_before_the_fault() -> None:
    from cocos_manager.api.dialout_requests import SALVAGE_SCAN, decode_request, salvage_id

    whole = pb.ComputationRunReq(id="abc", name="n").SerializeToString()
    assert salvage_id(whole[:-1]) == "abc"
    assert salvage_id(TRUNCATED) == ""
    assert salvage_id(b"\x0a\x02\xff\xfe") == ""  # not UTF-8: not an id
    assert salvage_id(b"\x0f") == ""  # wire type 7: nothing after it is trusted
    padding = b"\x10\x01" * (SALVAGE_SCAN // 2)  # field 2 as varints, again and again
    late = padding + b"\x0a\x01x" + TRUNCATED
    assert salvage_id(late) == ""  # beyond the scan: not searched
    undecodable = decode_request(b"\x0a\x01y" + padding + TRUNCATED)
    assert not isinstance(undecodable, pb.ComputationRunReq)
    assert undecodable.computation_id == "y" and undecodable.size == 3 + len(padding) + 4


def test_events_and_logs_are_bounded_in_bytes_too() -> None:
    """Answers are never dropped; events and logs are, once their bytes reach the bound, even
    with places left (an agent's messages may be 1 MiB each)."""
    from prometheus_client import CollectorRegistry

    from cocos_manager.api.dialout_buffer import OutgoingBuffer
    from cocos_manager.events.messages import log_message
    from cocos_manager.telemetry.metrics import Metrics

    buffer = OutgoingBuffer(
        100, 1000, in_flight=2, in_flight_bytes=100, metrics=Metrics(CollectorRegistry())
    )
    line = "x" * 300
    assert [buffer.offer(log_message("c", "info", line), connected=False) for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    assert buffer.bytes <= 1000 and buffer.dropped_total == 1
    buffer.push(log_message("c", "info", line))  # an answer: kept past the bound
    assert len(buffer) == 4
    while len(buffer):
        buffer.sent(buffer._messages[0][0])
    assert buffer.bytes == 0
    assert buffer.offer(log_message("c", "info", line), connected=False)


def _dial_out_parts(
    m: Manager, size: int = 100
) -> tuple[OutgoingBuffer, RunRequests, Callable[[], None]]:
    """The dial-out's buffer and request handling on the daemon's bus, tapped as
    api/dialout.py taps it, without a stream: what the buffer holds is what would be sent."""
    metrics = Metrics(CollectorRegistry())
    buffer = OutgoingBuffer(size, 1 << 20, 8, 1 << 20, metrics)
    runs = RunRequests(m.service, buffer, metrics, Complaints(get_logger()))
    untap = m.service.bus.tap(lambda message: runs.on_bus_message(message, True))
    return buffer, runs, untap


def _failures_sent(buffer: OutgoingBuffer, cid: str) -> list[dict[str, str]]:
    return [
        json.loads(message.agent_event.details or "{}")
        for message, _ in buffer._messages
        if message.agent_event.originator == "manager"
        and message.agent_event.computation_id == cid
        and (message.agent_event.event_type, message.agent_event.status)
        == ("vm-provision", "failed")
    ]


@pytest.mark.parametrize("originator", ["agent", "manager"])
async def test_no_other_failed_event_stands_in_for_the_answer_to_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, originator: str
) -> None:
    """A request whose Run is refused before admission (a duplicate id) is answered by the
    dial-out itself. Two other `vm-provision` `failed` events of that id, arriving while it is
    in flight, silenced the answer: an agent's own (agents choose event types, not the
    originator), and the service's for another Run of the same id (counted per id, not per
    Run)."""
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("dup"))
        buffer, runs, untap = _dial_out_parts(m)
        runs.on_message(run_request("dup").SerializeToString())  # refused: ALREADY_EXISTS
        other = pb.ClientStreamMessage(
            agent_event=pb.AgentEvent(
                event_type="vm-provision",
                status="failed",
                computation_id="dup",
                originator=originator,
            )
        )
        if originator == "agent":  # read from the VM's agent before that Run ran
            m.service.publish_agent_message(other)
        else:  # as the service publishes another Run's failure of the same id
            m.service.bus.publish(other)
        await runs.settle(5)
        untap()
        answers = [a for a in _failures_sent(buffer, "dup") if a]
        assert [a.get("code") for a in answers] == ["ALREADY_EXISTS"]
        await m.stub.Stop(pb.StopRequest(computation_id="dup"))


async def test_a_failed_start_is_told_once_even_by_a_full_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Run that fails after admission is told by the service's own event, not answered
    again; that event is the request's answer, so a full buffer does not drop it."""
    async with running_manager(tmp_path, monkeypatch) as m:
        monkeypatch.setenv("FAKE_QEMU_MODE", "fail")
        for cid, size in (("roomy", 100), ("full", 1)):  # 1: the place held for the answer
            buffer, runs, untap = _dial_out_parts(m, size)
            runs.on_message(run_request(cid).SerializeToString())
            await runs.settle(10)
            untap()
            told = _failures_sent(buffer, cid)
            assert len(told) == 1 and "fake failure" in told[0]["error"], told
            assert "code" not in told[0]  # the service's event, not the dial-out's answer
            if size == 1:
                assert buffer.dropped_total > 0  # its other events were dropped


async def test_requests_read_or_cut_short_by_the_shutdown_are_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown (settle): a request still validating when settle gives up on it, and one
    read after the shutdown began, got no answer at all. Both are answered UNAVAILABLE, and
    the second is not run."""
    import cocos_manager.service as service_module

    validating = asyncio.Event()
    real = service_module.validated_manifest

    async def slow(request: pb.ComputationRunReq) -> bytes:
        if request.id == "slow":
            validating.set()
            await asyncio.sleep(60)
        return await real(request)

    monkeypatch.setattr(service_module, "validated_manifest", slow)
    async with running_manager(tmp_path, monkeypatch) as m:
        buffer, runs, untap = _dial_out_parts(m)
        runs.on_message(run_request("slow").SerializeToString())
        await asyncio.wait_for(validating.wait(), WAIT)
        await runs.settle(0.2)
        runs.on_message(run_request("after").SerializeToString())
        await asyncio.sleep(0.1)
        untap()
        for cid in ("slow", "after"):
            answered = _failures_sent(buffer, cid)
            assert [a["code"] for a in answered] == ["UNAVAILABLE"], (cid, answered)
            assert "shutting down" in answered[0]["error"]
        assert "after" not in m.service.computations()


@pytest.mark.parametrize("fault", ["cancelled while starting", "a bug after admission"])
async def test_a_run_past_admission_is_told_once_however_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Its VM's own failed event is the answer: a start cancelled by the shutdown's settle
    (its VM released as a client's cancel), or one that raised something other than a
    ManagerError (a bug), was answered a second time."""
    import cocos_manager.vm.start as vm_start

    if fault == "cancelled while starting":
        monkeypatch.setenv("FAKE_QEMU_MODE", "no-qmp")  # never ready
    else:

        async def broken(machine: object) -> None:
            raise RuntimeError("a bug after admission")

        monkeypatch.setattr(vm_start, "note_launch", broken)
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_START_TIMEOUT="60s") as m:
        buffer, runs, untap = _dial_out_parts(m)
        runs.on_message(run_request("once").SerializeToString())
        if fault == "cancelled while starting":
            for _ in range(500):
                if "once" in m.service.computations():
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
        await runs.settle(0.2 if fault == "cancelled while starting" else WAIT)
        untap()
        told = _failures_sent(buffer, "once")
        assert len(told) == 1 and "code" not in told[0], told


async def test_a_failing_start_cancelled_mid_release_is_told_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that failed on its own, its release still under way (a QEMU slow to die) when
    the shutdown's settle cancels the request: the cancellation cut the start's wait for its
    release, the final event was not out yet, and the request was answered UNAVAILABLE as
    well as by that event."""
    import cocos_manager.vm.start as vm_start
    import cocos_manager.vm.stop as vm_stop
    from cocos_manager.errors import FailedPreconditionError

    def record_fails(machine: object) -> None:
        raise FailedPreconditionError("the record could not be written after QEMU started")

    real_end = vm_stop.end_or_tell

    async def slow_end(*args: Any, **kwargs: Any) -> dict[str, Any]:
        await asyncio.sleep(1.5)
        return await real_end(*args, **kwargs)

    monkeypatch.setattr(vm_start, "arm_ttl", record_fails)
    monkeypatch.setattr(vm_stop, "end_or_tell", slow_end)
    async with running_manager(tmp_path, monkeypatch) as m:
        buffer, runs, untap = _dial_out_parts(m)
        runs.on_message(run_request("slow-end").SerializeToString())
        for _ in range(1000):  # until the start failed and its release began
            machine = m.service.computations().get("slow-end")
            if machine is not None and machine._failing:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the start did not fail")
        await runs.settle(0.3)
        untap()
        told = _failures_sent(buffer, "slow-end")
        assert len(told) == 1 and "code" not in told[0], told
