"""The dial-out (docs/contracts.md, "The dial-out stream"): the daemon as a client of a computations server of the seed's era.

The server is `tests/support/computations_server.py`, a process of its own generated from the
seed's proto text alone. The manager is real (service, gRPC server, health) with the stand-in
QEMU; the daemon itself, as a process, where start-up and restarts are the point.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.api.dialout import BUFFER_BYTES, HEALTH_SERVICE, DialOut
from cocos_manager.config.dialout import DialOutConfigError, dialout_config
from cocos_manager.config.settings import load_settings
from cocos_manager.config.tls import TlsConfigError
from cocos_manager.events.messages import log_message
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry.metrics import Metrics
from tests.support.certs import issue
from tests.support.computations_server import (
    ComputationsServer,
    Message,
    details,
    event_for,
    log_for,
    run_res_for,
)
from tests.support.daemon_process import Daemon
from tests.support.harness import Manager, base_env, run_request, running_manager
from tests.support.streams import read_agent
from tests.support.waiting import wait_for

WAIT = 20.0


def as_json(request: pb.ComputationRunReq) -> Message:
    """A request in protobuf's JSON mapping, which the server parses into its own classes."""
    return json_format.MessageToDict(request, preserving_proto_field_name=True)


@asynccontextmanager
async def computations_server(
    tmp_path: Path, **options: object
) -> AsyncIterator[ComputationsServer]:
    server = ComputationsServer(tmp_path / "computations.log", **options)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def dialing_manager(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    *,
    buffer_size: int = 10_000,
    **env: str,
) -> AsyncIterator[tuple[Manager, DialOut, Metrics]]:
    """A manager with the dial-out wired as the daemon wires it (made before serving, health
    reported on the manager's own health service), with metrics of its own."""
    async with running_manager(
        tmp_path, monkeypatch, dial_out=False, MANAGER_GRPC_URL=url, **env
    ) as manager:
        config = dialout_config(manager.settings.service)
        assert config is not None
        metrics = Metrics(CollectorRegistry())
        dialout = DialOut(config, manager.service, buffer_size=buffer_size, metrics=metrics)
        dialout.start(manager.server.health)
        try:
            yield manager, dialout, metrics
        finally:
            await dialout.close()


async def until(condition: object, what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.02)


async def dialout_health(manager: Manager) -> int:
    stub = health_pb2_grpc.HealthStub(manager.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE))
    return int(reply.status)


# -- requests ---------------------------------------------------------------------------------


async def test_requests_get_run_res_with_the_port_and_every_event_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        computations_server(tmp_path) as server,
        dialing_manager(tmp_path, monkeypatch, server.url) as (manager, dialout, metrics),
    ):
        requests = [run_request("c-a"), run_request("c-b", datasets=2)]
        for request in requests:
            await server.push(as_json(request))
        for request in requests:
            res = await server.wait_for(run_res_for(request.id), WAIT, f"run_res {request.id}")
            port = int(res["run_res"]["agent_port"])
            assert read_agent(port) == manifest_json(request)
            for status in ("starting", "in-progress", "complete"):
                await server.wait_for(
                    event_for(request.id, "vm-provision", status), WAIT, f"{status} {request.id}"
                )
            await server.wait_for(log_for(request.id, f"BOOTED {request.id}"), WAIT, "console")
        await until(lambda: dialout.connected, "connected")
        assert await dialout_health(manager) == 1  # SERVING
        assert metrics.dialout_connected.value() == 1
        # The same computations as any other: a local Stop, reported up the stream.
        await manager.service.stop("c-a")
        await server.wait_for(event_for("c-a", "vm-stop", "complete"), WAIT, "vm-stop")
        assert set(manager.service.computations()) == {"c-b"}


async def test_a_bad_request_is_answered_with_a_failed_event_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        computations_server(tmp_path) as server,
        dialing_manager(tmp_path, monkeypatch, server.url) as (manager, dialout, _),
    ):
        no_algorithm = run_request("bad")
        no_algorithm.ClearField("algorithm")
        await server.push(as_json(no_algorithm))
        failed = await server.wait_for(event_for("bad", "vm-provision", "failed"), WAIT, "failed")
        assert details(failed)["code"] == "INVALID_ARGUMENT"
        assert "algorithm" in details(failed)["error"]

        await server.push(as_json(run_request("good")))
        await server.wait_for(run_res_for("good"), WAIT, "run_res good")
        # A duplicate id: the stream is told, the running computation is untouched.
        await server.push(as_json(run_request("good")))
        dup = await server.wait_for(event_for("good", "vm-provision", "failed"), WAIT, "dup")
        assert details(dup)["code"] == "ALREADY_EXISTS"
        assert "good" in manager.service.computations()

        # QEMU failing: the service's own failed event (QEMU's words) goes up, exactly once.
        monkeypatch.setenv("FAKE_QEMU_MODE", "fail")
        await server.push(as_json(run_request("qemu-fails")))
        failed = await server.wait_for(
            event_for("qemu-fails", "vm-provision", "failed"), WAIT, "qemu failure"
        )
        assert "fake failure" in details(failed)["error"]
        monkeypatch.delenv("FAKE_QEMU_MODE")
        await server.push(as_json(run_request("after")))
        await server.wait_for(run_res_for("after"), WAIT, "run_res after")
        reports = [
            m for m in server.received if event_for("qemu-fails", "vm-provision", "failed")(m)
        ]
        assert len(reports) == 1, [details(r) for r in reports]
        assert server.connections() == 1, "the stream must survive failed Runs"
        assert dialout.connected


async def test_requests_run_at_once_not_one_after_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Run still waiting for its VM does not hold up the next request."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "no-qmp")  # this VM never becomes ready
    async with (
        computations_server(tmp_path) as server,
        dialing_manager(tmp_path, monkeypatch, server.url, MANAGER_QEMU_START_TIMEOUT="60s") as (
            manager,
            _,
            _,
        ),
    ):
        await server.push(as_json(run_request("slow")))
        await server.wait_for(event_for("slow", "vm-provision", "in-progress"), WAIT, "spawned")
        monkeypatch.delenv("FAKE_QEMU_MODE")
        await server.push(as_json(run_request("quick")))
        await server.wait_for(run_res_for("quick"), WAIT, "run_res quick")
        assert not any(run_res_for("slow")(m) for m in server.received)
        await manager.service.stop("slow")  # the waiting Run ends: the stream hears why
        failed = await server.wait_for(event_for("slow", "vm-provision", "failed"), WAIT, "slow")
        assert "was stopped while its VM was starting" in details(failed)["error"]
        assert details(failed)["code"] == "ABORTED"


# -- reconnection and the buffer ------------------------------------------------------------


async def test_a_restarted_server_is_reconnected_and_gets_what_happened_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        computations_server(tmp_path) as server,
        dialing_manager(tmp_path, monkeypatch, server.url) as (manager, dialout, metrics),
    ):
        await server.push(as_json(run_request("before")))
        await server.wait_for(run_res_for("before"), WAIT, "run_res before")
        with capture_logs() as logs:
            await server.stop()
            await until(lambda: not dialout.connected, "the dial-out notices the drop")
            assert await dialout_health(manager) == 2  # NOT_SERVING
            assert metrics.dialout_connected.value() == 0
            # The VM lives on, and what happens to it meanwhile is kept for the server.
            assert "before" in manager.service.computations()
            await manager.service.stop("before")
            await until(lambda: dialout.attempts >= 3, "a few attempts while the server is down")
            lines_before = len(server.lines)
            await server.start()
            await until(lambda: dialout.connected, "reconnected")
        await server.wait_for(
            event_for("before", "vm-stop", "complete"), WAIT, "buffered vm-stop", lines_before
        )
        await server.push(as_json(run_request("after")))
        await server.wait_for(run_res_for("after"), WAIT, "run_res after")
        assert await dialout_health(manager) == 1
        changes = [e["event"] for e in logs if e["log_level"] != "debug"]
        changes = [e for e in changes if e.startswith(("dial-out c", "dial-out r"))]
        assert changes == ["dial-out retrying", "dial-out connected"], changes


async def test_an_unreachable_server_is_retried_with_growing_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with computations_server(tmp_path) as server:
        url = server.url
    async with dialing_manager(tmp_path, monkeypatch, url) as (manager, dialout, _):
        await until(lambda: dialout.attempts >= 4, "four attempts")
        pauses = dialout.pauses[:4]
        assert all(0 < p <= 30 for p in pauses)
        assert pauses[3] > pauses[0], pauses  # back-off grows (jittered within [d/2, d])
        # Runs from elsewhere are not slowed by the missing server.
        response = await manager.stub.Run(run_request("local"), timeout=WAIT)
        assert response.computation_id == "local"


async def test_the_buffer_is_bounded_and_what_overflows_is_counted_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with computations_server(tmp_path) as server:
        url, port = server.url, server.port
    restarted = ComputationsServer(tmp_path / "computations-2.log")
    restarted.port = port
    async with dialing_manager(tmp_path, monkeypatch, url, buffer_size=5) as (manager, dialout, m):
        with capture_logs() as logs:
            for i in range(20):
                manager.service.bus.publish(log_message("burst", "info", f"line {i}"))
        assert dialout.dropped_total == 15
        assert m.dialout_dropped.value() == 15
        full = [e for e in logs if e["event"].startswith("dial-out buffer full")]
        assert len(full) == 1
        await restarted.start()
        try:
            await restarted.wait_for(log_for("burst", "line 4"), WAIT, "the kept lines")
            kept = [m["agent_log"]["message"] for m in restarted.received if "agent_log" in m]
            assert kept == [f"line {i}" for i in range(5)]
        finally:
            await restarted.stop()


async def test_an_agent_sending_large_messages_while_the_server_is_down_is_bounded_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 agent messages of 1 MiB (the most a frame may carry) while the server is down: the
    dial-out keeps BUFFER_BYTES of them and drops the rest, counted; it kept all 40 before."""
    async with computations_server(tmp_path) as server:
        url = server.url  # stopped: nothing listens there any more
    async with dialing_manager(tmp_path, monkeypatch, url) as (manager, dialout, m):
        big = "x" * (1024 * 1024 - 256)
        for i in range(40):
            manager.service.bus.publish(log_message("flood", "info", f"{i} {big}"))
        kept = 40 - dialout.dropped_total
        assert 0 < kept * len(big) <= BUFFER_BYTES and dialout.dropped_total >= 24
        assert m.dialout_dropped.value() == dialout.dropped_total


async def test_a_server_that_stops_reading_slows_no_run_and_is_dialled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        computations_server(tmp_path) as server,
        # The write timeout ends the stalled stream, and the next stream takes the whole
        # backlog (about 460 messages here): the Run below must be answered before that, and
        # a loaded host has taken over 2 s for it. 5 s leaves it room.
        dialing_manager(tmp_path, monkeypatch, server.url, MANAGER_GRPC_TIMEOUT="5s") as (
            manager,
            dialout,
            metrics,
        ),
    ):
        await server.push(as_json(run_request("first")))
        await server.wait_for(run_res_for("first"), WAIT, "run_res first")
        await server.stall(True)
        filler = "x" * 6000
        for i in range(1500):  # 9 MB: about twice what HTTP/2 flow control lets through unread
            manager.service.bus.publish(log_message("flood", "info", f"{filler} {i}"))
        await until(lambda: metrics.dialout_buffered.value() > 300, "a backlog")
        response = await manager.stub.Run(run_request("meanwhile"), timeout=WAIT)
        assert response.computation_id == "meanwhile"
        assert dialout.connects == 1, "the Run took longer than the write timeout"
        assert metrics.dialout_buffered.value() > 300, "Run waited for the stream"
        # MANAGER_GRPC_TIMEOUT: a server that takes no message for that long is dialled again.
        await until(lambda: "took no message" in dialout.last_error, "the write timeout")
        await server.stall(False)
        await server.wait_for(log_for("flood", f"{filler} 1499"), WAIT, "the last line")
        await server.wait_for(event_for("meanwhile", "vm-provision", "complete"), WAIT, "complete")
        assert dialout.dropped_total == 0


# -- TLS --------------------------------------------------------------------------------------


async def test_mutual_tls_with_certificates_made_here_and_a_stranger_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, stranger_ca = issue("computations CA"), issue("stranger CA")
    server_cert, server_key = issue("computations", ca, server=True).write(tmp_path, "server")
    client_cert, client_key = issue("manager", ca).write(tmp_path, "client")
    stranger_cert, stranger_key = issue("stranger", stranger_ca).write(tmp_path, "stranger")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(ca.cert_pem)
    tls = (server_cert, server_key, str(ca_file))
    async with computations_server(tmp_path, tls=tls) as server:
        async with dialing_manager(
            tmp_path / "stranger",
            monkeypatch,
            server.url,
            MANAGER_GRPC_SERVER_CA_CERTS=str(ca_file),
            MANAGER_GRPC_CLIENT_CERT=stranger_cert,
            MANAGER_GRPC_CLIENT_KEY=stranger_key,
        ) as (_, stranger, _):
            await until(lambda: stranger.attempts >= 2, "the stranger tried twice")
            assert not stranger.connected
            assert "UNAVAILABLE" in stranger.last_error
        assert server.connections() == 0, "the server let a stranger's stream in"

        async with dialing_manager(
            tmp_path / "member",
            monkeypatch,
            server.url,
            MANAGER_GRPC_SERVER_CA_CERTS=str(ca_file),
            MANAGER_GRPC_CLIENT_CERT=client_cert,
            MANAGER_GRPC_CLIENT_KEY=client_key,
        ) as (_, dialout, _):
            assert dialout.config.mode == "mTLS"
            await server.push(as_json(run_request("over-mtls")))
            await server.wait_for(run_res_for("over-mtls"), WAIT, "run_res over mTLS")
            assert server.connections() == 1

        # A manager that trusts another CA does not talk to this server either.
        async with dialing_manager(
            tmp_path / "distrust",
            monkeypatch,
            server.url,
            MANAGER_GRPC_URL_CA_CERTS=stranger_ca.cert_pem,
            MANAGER_GRPC_CLIENT_CERT=client_cert,
            MANAGER_GRPC_CLIENT_KEY=client_key,
        ) as (_, distrust, _):
            await until(lambda: distrust.attempts >= 2, "two attempts")
            assert not distrust.connected
        assert server.connections() == 1


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MANAGER_GRPC_CLIENT_CERT": "c.pem"}, "MANAGER_GRPC_CLIENT_KEY"),
        ({"MANAGER_GRPC_CLIENT_KEY": "k.pem"}, "MANAGER_GRPC_CLIENT_CERT"),
        ({"MANAGER_GRPC_SERVER_CA_CERTS": "/nonexistent/ca.pem"}, "MANAGER_GRPC_SERVER_CA_CERTS"),
        ({"MANAGER_GRPC_URL_CA_CERTS": "-----BEGIN nothing"}, "MANAGER_GRPC_URL_CA_CERTS"),
        ({"MANAGER_GRPC_ATTESTED_TLS": "true"}, "MANAGER_GRPC_ATTESTED_TLS"),
        ({"MANAGER_GRPC_URL": "localhost:7001"}, "MANAGER_GRPC_URL"),
        ({"MANAGER_GRPC_URL": "127.0.0.1:7001"}, "MANAGER_GRPC_URL"),
    ],
)
def test_settings_it_cannot_work_with_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    monkeypatch.setenv("MANAGER_GRPC_URL", "computations.example:7001")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((DialOutConfigError, TlsConfigError)) as info:
        dialout_config(load_settings().service)
    assert str(info.value).startswith(named), str(info.value)


def test_client_settings_without_a_url_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_GRPC_CLIENT_CERT", "c.pem")
    with pytest.raises(Exception, match=r"^MANAGER_GRPC_CLIENT_CERT: set, but MANAGER_GRPC_URL"):
        dialout_config(load_settings().service)


def test_no_url_no_dial_out_and_the_seed_ca_variable_alone_is_fine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert dialout_config(load_settings().service) is None
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(issue("ca").cert_pem)
    # The seed's deployment: a CA for the computations server and no server certificate.
    monkeypatch.setenv("MANAGER_GRPC_URL", "localhost:7101")
    monkeypatch.setenv("MANAGER_GRPC_SERVER_CA_CERTS", str(ca_file))
    config = dialout_config(load_settings().service)
    assert config is not None and config.mode == "TLS"
    assert config.timeout == 60.0
    monkeypatch.setenv("MANAGER_GRPC_TIMEOUT", "1m30s")
    assert load_settings().service.GRPC_TIMEOUT == 90.0


async def test_the_daemon_refuses_half_a_client_tls_configuration_at_start(
    tmp_path: Path,
) -> None:
    daemon = Daemon(
        env={
            **base_env(tmp_path),
            "MANAGER_GRPC_URL": "localhost:1",
            "MANAGER_GRPC_CLIENT_CERT": str(tmp_path / "client.crt"),
        },
        log=tmp_path / "daemon.log",
    )
    with pytest.raises(RuntimeError, match=r"exited with \d+ at start"):
        await daemon.start()
    assert daemon.process is not None and daemon.process.returncode == 2
    assert (
        "MANAGER_GRPC_CLIENT_KEY: not set, but MANAGER_GRPC_CLIENT_CERT is"
        in daemon.log.read_text()
    )


# -- the daemon as a process: health and restart survival -----------------------------------


def shutdown_notice_of(status: str) -> Callable[[Message], bool]:
    return lambda m: (
        m.get("agent_event", {}).get("event_type") == "manager-shutdown"
        and m["agent_event"].get("status") == status
    )


async def test_computations_from_the_stream_survive_a_daemon_restart(tmp_path: Path) -> None:
    async with computations_server(tmp_path) as server:
        daemon = Daemon(
            env={**base_env(tmp_path), "MANAGER_GRPC_URL": server.url},
            log=tmp_path / "daemon.log",
        )
        await daemon.start()
        try:
            health = health_pb2_grpc.HealthStub(daemon.channel)
            request = run_request("survivor")
            await server.push(as_json(request))
            res = await server.wait_for(run_res_for("survivor"), WAIT, "run_res")
            port = int(res["run_res"]["agent_port"])
            reply = await health.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            await daemon.kill()
            await server.wait_line(lambda line: "ended" in line, WAIT, "the stream to drop")
            lines_before = len(server.lines)
            await daemon.start()
            readopted = await server.wait_for(
                event_for("survivor", "vm-provision", "complete"), WAIT, "re-adoption", lines_before
            )
            assert details(readopted)["readopted"] is True
            assert read_agent(port) == manifest_json(request)
            await daemon.stub.Stop(pb.StopRequest(computation_id="survivor"), timeout=WAIT)
            await server.wait_for(
                event_for("survivor", "vm-stop", "complete"), WAIT, "vm-stop", lines_before
            )
            # The control plane hears the daemon go, as Events subscribers do (a seed-era
            # server takes the notice's empty computation id). Once the stream is up again: a
            # shutdown while the dial-out is still dialling has no stream to send on.
            await wait_for(
                lambda: daemon.log.read_text().count('"dial-out connected"') >= 2,
                "the dial-out to reconnect",
                WAIT,
            )
            assert await daemon.terminate() == 0
            # The shutdown's first notice and its last one, after the VMs stopped: the dial-out
            # ends the stream only once the server has read everything before its end.
            starting = await server.wait_for(
                shutdown_notice_of("starting"), WAIT, "manager-shutdown starting", lines_before
            )
            assert details(starting)["stops_vms"] is True
            complete = await server.wait_for(
                shutdown_notice_of("complete"), WAIT, "manager-shutdown complete", lines_before
            )
            assert details(complete) == {"left_running": []}
        finally:
            if daemon.process is not None and daemon.process.poll() is None:
                assert await daemon.terminate() == 0
        log = [
            json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{")
        ]
        assert any(entry["message"] == "dial-out connected" for entry in log)
