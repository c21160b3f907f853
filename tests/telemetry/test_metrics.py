"""/metrics scraped over HTTP from a real server, counting RPCs of a real grpc.aio server."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from cocos_manager.api.interceptors import TelemetryInterceptor
from cocos_manager.telemetry.metrics import (
    METRICS,
    Metrics,
    MetricsServer,
    MetricsServerError,
    start_metrics_server,
)

HEALTH_CHECK = "grpc.health.v1.Health/Check"


def _scrape_text(server: MetricsServer) -> str:
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


async def _scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    text = await asyncio.to_thread(_scrape_text, server)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
async def metrics_server() -> AsyncIterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics()
    server = await start_metrics_server(0, "127.0.0.1", metrics)
    assert server is not None
    yield metrics, server
    await server.close()


@pytest.fixture
async def health_port(metrics_server: tuple[Metrics, MetricsServer]) -> AsyncIterator[int]:
    metrics, _ = metrics_server
    interceptor = TelemetryInterceptor(TracerProvider(), metrics)
    server = grpc.aio.server(interceptors=[interceptor])
    health = HealthServicer()
    await health.set("manager", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(None)


async def _check(port: int, service: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_requests_are_counted_by_method_and_code(
    metrics_server: tuple[Metrics, MetricsServer], health_port: int
) -> None:
    _, server = metrics_server
    for _ in range(3):
        assert await _check(health_port, "manager") is grpc.StatusCode.OK
    assert await _check(health_port, "unknown") is grpc.StatusCode.NOT_FOUND

    samples = await _scrape(server)
    ok = (("code", "OK"), ("method", HEALTH_CHECK))
    not_found = (("code", "NOT_FOUND"), ("method", HEALTH_CHECK))
    assert samples[("manager_requests_total", ok)] == 3
    assert samples[("manager_requests_total", not_found)] == 1
    assert samples[("manager_request_duration_seconds_count", ok)] == 3
    assert samples[("manager_request_duration_seconds_count", not_found)] == 1
    assert 0 < samples[("manager_request_duration_seconds_sum", ok)] < 5
    assert (
        samples[("manager_request_duration_seconds_bucket", tuple(sorted((*ok, ("le", "+Inf")))))]
        == 3
    )


async def test_unknown_methods_are_not_counted(
    metrics_server: tuple[Metrics, MetricsServer], health_port: int
) -> None:
    _, server = metrics_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary("/made.Up/Method")(b"", timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    samples = await _scrape(server)
    assert not [key for key in samples if key[0] == "manager_requests_total"]


async def test_service_metrics_are_exposed(metrics_server: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = metrics_server
    metrics.vms_running.set(2)
    metrics.run_failures.labels(reason="qemu_exited").inc()
    metrics.run_failures.labels(reason="start_timeout").inc(2)
    metrics.events_dropped.inc(5)
    metrics.agent_messages.inc(7)
    samples = await _scrape(server)
    assert samples[("manager_vms_running", ())] == 2
    assert samples[("manager_run_failures_total", (("reason", "qemu_exited"),))] == 1
    assert samples[("manager_run_failures_total", (("reason", "start_timeout"),))] == 2
    assert samples[("manager_events_dropped_total", ())] == 5
    assert samples[("manager_agent_messages_total", ())] == 7


async def test_the_global_metrics_have_every_series_and_nothing_else() -> None:
    server = await start_metrics_server(0, "127.0.0.1")
    assert server is not None
    try:
        text = await asyncio.to_thread(_scrape_text, server)
    finally:
        await server.close()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert names == {
        "manager_requests",
        "manager_request_duration_seconds",
        "manager_vms_running",
        "manager_run_failures",
        "manager_events_dropped",
        "manager_agent_messages",
        "manager_agent_messages_late",
    }
    assert isinstance(METRICS, Metrics)


async def test_the_dial_out_series_exist_only_with_a_dial_out() -> None:
    """Without MANAGER_GRPC_URL there is nothing to be connected to: a
    manager_dialout_connected of 0 would read as "the dial-out is down" and page someone."""
    metrics = Metrics()
    server = await start_metrics_server(0, "127.0.0.1", metrics)
    assert server is not None
    dialout = {
        "manager_dialout_connected",
        "manager_dialout_buffered",
        "manager_dialout_dropped",
        "manager_dialout_requests",
    }
    try:
        off = await asyncio.to_thread(_scrape_text, server)
        assert not {f.name for f in text_string_to_metric_families(off)} & dialout
        metrics.register_dialout()
        metrics.dialout_connected.set(1)
        on = await asyncio.to_thread(_scrape_text, server)
        assert {f.name for f in text_string_to_metric_families(on)} >= dialout
        assert "manager_dialout_connected 1.0" in on
        metrics.unregister_dialout()
        after = await asyncio.to_thread(_scrape_text, server)
        assert not {f.name for f in text_string_to_metric_families(after)} & dialout
    finally:
        await server.close()


async def test_off_without_a_port_and_closed_means_closed() -> None:
    assert await start_metrics_server(None, "127.0.0.1") is None
    server = await start_metrics_server(0, "127.0.0.1", Metrics())
    assert server is not None
    await server.close()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_scrape_text, server)


async def test_a_taken_port_names_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsServerError, match=r"^MANAGER_METRICS_PORT: .*127\.0\.0\.1"):
            await start_metrics_server(port, "127.0.0.1", Metrics())


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """As prometheus-client's own Histogram: a value equal to a bound is in that bucket."""
    metrics = Metrics()
    for seconds in (0.005, 0.007, 2.0, 1000.0):
        metrics.observe_request("m/M", "OK", seconds)
    value = metrics.registry.get_sample_value
    labels = {"method": "m/M", "code": "OK"}
    bucket = "manager_request_duration_seconds_bucket"
    assert value(bucket, {**labels, "le": "0.005"}) == 1
    assert value(bucket, {**labels, "le": "0.01"}) == 2
    assert value(bucket, {**labels, "le": "2.5"}) == 3
    assert value(bucket, {**labels, "le": "300.0"}) == 3
    assert value(bucket, {**labels, "le": "+Inf"}) == 4
    assert value("manager_request_duration_seconds_count", labels) == 4
    assert value("manager_request_duration_seconds_sum", labels) == 1002.012
    assert value("manager_requests_total", labels) == 4
