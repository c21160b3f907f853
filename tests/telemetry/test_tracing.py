"""Spans reach real loopback collectors, in Jaeger's thrift and in OTLP, in the caller's trace."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util._once import Once
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.utils import deserialize

from cocos_manager.api.interceptors import TelemetryInterceptor
from cocos_manager.config.choices import LogLevel
from cocos_manager.config.settings import ServiceSettings
from cocos_manager.telemetry.jaeger import jaeger_thrift
from cocos_manager.telemetry.logging import configure_logging
from cocos_manager.telemetry.metrics import Metrics
from cocos_manager.telemetry.tracing import setup_tracing, shutdown_tracing
from tests.support.waiting import wait_for

SERVICE = "manager.ManagerService"
TRACE_ID = 0xFEDCBA9876543210F123456789ABCDEF  # both halves have the top bit set
CALLER_SPAN_ID = 0xC000000000000001
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
INSTANCE_ID = "instance-under-test"


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# --- loopback collectors ------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Collector:
    """An HTTP server recording every POST, answering `status`."""

    port: int = 0
    status: int = 202
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {key.lower(): value for key, value in self.headers.items()}
                collector.received.append(Received(self.path, headers, body))
                self.send_response(collector.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    yield server
    server.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- tracing set up as the daemon does ----------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_global_tracer_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenTelemetry lets the global provider be set once per process; each test sets its own."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    configure_logging(LogLevel.INFO, stream=buffer)
    yield buffer
    structlog.reset_defaults()


def _messages(buffer: io.StringIO, prefix: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line]
    return [line for line in lines if line["message"].startswith(prefix)]


def _tracing(monkeypatch: pytest.MonkeyPatch, url: str, **options: Any) -> TracerProvider:
    monkeypatch.setenv("COCOS_JAEGER_URL", url)
    return setup_tracing(ServiceSettings(), INSTANCE_ID, **options)


# --- a tiny manager-like service: the interceptor must not care what it serves ------------


async def _run(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    with trace.get_tracer("test.service").start_as_current_span("validate") as span:
        span.set_attribute("request.size", len(request))
        await asyncio.sleep(0)
    with trace.get_tracer("test.service").start_as_current_span("start QEMU"):
        await asyncio.sleep(0)
    return b"ok:" + request


async def _stop(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no computation " + request.decode())
    raise AssertionError("abort returned")


async def _explode(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError("handler bug")


async def _events(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    for number in range(3):
        with trace.get_tracer("test.service").start_as_current_span(f"event {number}"):
            await asyncio.sleep(0)
        yield b"event %d" % number


async def _watch(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """A streaming handler written with context.write instead of yield."""
    with trace.get_tracer("test.service").start_as_current_span("watch step"):
        await context.write(b"written")


async def _forever(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.Event().wait()


@pytest.fixture
async def server_for() -> AsyncIterator[Any]:
    servers: list[grpc.aio.Server] = []

    async def start(provider: TracerProvider | None, metrics: Metrics | None = None) -> int:
        interceptor = TelemetryInterceptor(provider, metrics or Metrics())
        server = grpc.aio.server(interceptors=[interceptor])
        handlers = {
            "Run": grpc.unary_unary_rpc_method_handler(_run),
            "Stop": grpc.unary_unary_rpc_method_handler(_stop),
            "Explode": grpc.unary_unary_rpc_method_handler(_explode),
            "Events": grpc.unary_stream_rpc_method_handler(_events),
            "Watch": grpc.unary_stream_rpc_method_handler(_watch),
            "Forever": grpc.unary_stream_rpc_method_handler(_forever),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port: int = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        await server.stop(None)


async def _call(port: int, method: str, *, traceparent: str | None = TRACEPARENT) -> Any:
    metadata = (("traceparent", traceparent), ("tracestate", "vendor=value")) if traceparent else ()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        if method in ("Events", "Watch"):
            stream = channel.unary_stream(f"/{SERVICE}/{method}")
            return [item async for item in stream(b"req", metadata=metadata, timeout=10)]
        return await channel.unary_unary(f"/{SERVICE}/{method}")(
            b"req", metadata=metadata, timeout=10
        )


async def _flush(provider: TracerProvider) -> None:
    await asyncio.to_thread(provider.force_flush)


# --- Jaeger thrift ------------------------------------------------------------------------


def _thrift_value(buf: memoryview, pos: int, ttype: int) -> tuple[Any, int]:
    """A generic TBinaryProtocol reader: checks field ids against the wire, not our IDL."""
    fixed = {2: ("!?", 1), 3: ("!b", 1), 4: ("!d", 8), 6: ("!h", 2), 8: ("!i", 4), 10: ("!q", 8)}
    if ttype in fixed:
        fmt, size = fixed[ttype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + size
    if ttype == 11:
        (size,) = struct.unpack_from("!i", buf, pos)
        return bytes(buf[pos + 4 : pos + 4 + size]), pos + 4 + size
    if ttype == 12:
        fields: dict[int, Any] = {}
        while True:
            field_type = buf[pos]
            pos += 1
            if field_type == 0:
                return fields, pos
            (field_id,) = struct.unpack_from("!h", buf, pos)
            fields[field_id], pos = _thrift_value(buf, pos + 2, field_type)
    if ttype in (14, 15):
        element_type, size = buf[pos], struct.unpack_from("!i", buf, pos + 1)[0]
        pos += 5
        items = []
        for _ in range(size):
            item, pos = _thrift_value(buf, pos, element_type)
            items.append(item)
        return items, pos
    raise AssertionError(f"unexpected thrift type {ttype}")


def _tags(tags: list[Any]) -> dict[str, Any]:
    values = {}
    for tag in tags or []:
        values[tag.key] = next(
            v for v in (tag.vStr, tag.vLong, tag.vBool, tag.vDouble, tag.vBinary) if v is not None
        )
    return values


def _jaeger_spans(collector: Collector) -> tuple[list[Any], list[Any]]:
    batches = []
    for received in collector.received:
        assert received.path == "/api/traces"
        assert received.headers["content-type"] == "application/x-thrift"
        batch = deserialize(jaeger_thrift().Batch(), received.body, TBinaryProtocolFactory())  # type: ignore[no-untyped-call]
        batches.append(batch)
    return batches, [span for batch in batches for span in batch.spans]


async def test_jaeger_thrift_spans_continue_the_callers_trace(
    collector: Collector, monkeypatch: pytest.MonkeyPatch, server_for: Any
) -> None:
    provider = _tracing(monkeypatch, collector.url("/api/traces"))
    port = await server_for(provider)
    before_us = time.time_ns() // 1000
    assert await _call(port, "Run") == b"ok:req"
    await _flush(provider)

    batches, spans = _jaeger_spans(collector)
    process = batches[0].process
    assert process.serviceName == "manager"
    process_tags = _tags(process.tags)
    assert process_tags["host.id"] == INSTANCE_ID
    assert process_tags["telemetry.sdk.language"] == "python"
    assert "service.name" not in process_tags

    by_name = {span.operationName: span for span in spans}
    assert set(by_name) == {f"{SERVICE}/Run", "validate", "start QEMU"}
    server = by_name[f"{SERVICE}/Run"]
    assert server.traceIdHigh == _signed(TRACE_ID >> 64) < 0
    assert server.traceIdLow == _signed(TRACE_ID & (2**64 - 1)) < 0
    assert server.parentSpanId == _signed(CALLER_SPAN_ID)
    assert server.flags == 1
    assert before_us - 1_000_000 <= server.startTime <= time.time_ns() // 1000
    assert server.duration >= 0
    server_tags = _tags(server.tags)
    assert server_tags["span.kind"] == "server"
    assert server_tags["rpc.system"] == "grpc"
    assert server_tags["rpc.service"] == SERVICE
    assert server_tags["rpc.method"] == "Run"
    assert server_tags["rpc.grpc.status_code"] == 0
    assert server_tags["network.peer.address"] == "127.0.0.1"
    assert "error" not in server_tags
    for child_name in ("validate", "start QEMU"):
        child = by_name[child_name]
        assert (child.traceIdHigh, child.traceIdLow) == (server.traceIdHigh, server.traceIdLow)
        assert child.parentSpanId == server.spanId
        assert child.startTime >= server.startTime
    assert _tags(by_name["validate"].tags)["request.size"] == 3

    # The same bytes read without our IDL: Jaeger's field ids.
    raw, _ = _thrift_value(memoryview(collector.received[0].body), 0, 12)
    assert raw[1][1] == b"manager"  # Batch.process.serviceName
    raw_spans = {span[5].decode(): span for span in raw[2]}  # Span.operationName
    raw_server = raw_spans[f"{SERVICE}/Run"]
    assert (raw_server[1], raw_server[2]) == (server.traceIdLow, server.traceIdHigh)
    assert (raw_server[3], raw_server[4]) == (server.spanId, _signed(CALLER_SPAN_ID))
    assert raw_server[7] == 1  # flags


async def test_jaeger_status_codes_and_streams(
    collector: Collector, monkeypatch: pytest.MonkeyPatch, server_for: Any
) -> None:
    provider = _tracing(monkeypatch, collector.url("/api/traces"))
    port = await server_for(provider)
    assert await _call(port, "Events") == [b"event 0", b"event 1", b"event 2"]
    assert await _call(port, "Watch") == [b"written"]
    with pytest.raises(grpc.aio.AioRpcError) as not_found:
        await _call(port, "Stop")
    assert not_found.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _call(port, "Explode", traceparent=None)
    assert unknown.value.code() is grpc.StatusCode.UNKNOWN
    await _flush(provider)

    _, spans = _jaeger_spans(collector)
    by_name = {span.operationName: span for span in spans}
    events = by_name[f"{SERVICE}/Events"]
    assert _tags(events.tags)["rpc.grpc.status_code"] == 0
    for number in range(3):
        assert by_name[f"event {number}"].parentSpanId == events.spanId
    assert by_name["watch step"].parentSpanId == by_name[f"{SERVICE}/Watch"].spanId

    stop_tags = _tags(by_name[f"{SERVICE}/Stop"].tags)
    assert stop_tags["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "error" not in stop_tags  # the client's mistake, not the server's

    explode = by_name[f"{SERVICE}/Explode"]
    explode_tags = _tags(explode.tags)
    assert explode_tags["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]
    assert explode_tags["error"] is True
    assert explode_tags["otel.status_code"] == "ERROR"
    assert explode_tags["otel.status_description"] == "RuntimeError: handler bug"
    assert explode.parentSpanId == 0  # no traceparent: a trace of its own
    assert (explode.traceIdHigh, explode.traceIdLow) != (_signed(TRACE_ID >> 64), _signed(TRACE_ID))
    exception_log = _tags(explode.logs[0].fields)
    assert exception_log["event"] == "exception"
    assert exception_log["exception.type"] == "RuntimeError"


async def test_a_stream_the_client_cancels_ends_its_span_as_cancelled(
    collector: Collector, monkeypatch: pytest.MonkeyPatch, server_for: Any
) -> None:
    provider = _tracing(monkeypatch, collector.url("/api/traces"))
    metrics = Metrics()
    port = await server_for(provider, metrics)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(f"/{SERVICE}/Forever")(b"req")
        assert await call.read() == b"first"
        call.cancel()
    cancelled = {"method": f"{SERVICE}/Forever", "code": "CANCELLED"}
    await wait_for(  # the server learns of the cancellation asynchronously
        lambda: metrics.registry.get_sample_value("manager_requests_total", cancelled),
        "the cancelled call to be counted",
    )
    assert metrics.registry.get_sample_value("manager_requests_total", cancelled) == 1
    await _flush(provider)
    _, spans = _jaeger_spans(collector)
    (forever,) = [span for span in spans if span.operationName == f"{SERVICE}/Forever"]
    tags = _tags(forever.tags)
    assert tags["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert "error" not in tags


# --- OTLP ---------------------------------------------------------------------------------


async def test_otlp_spans_continue_the_callers_trace(
    collector: Collector, monkeypatch: pytest.MonkeyPatch, server_for: Any
) -> None:
    collector.status = 200
    provider = _tracing(monkeypatch, collector.url("/v1/traces"))
    port = await server_for(provider)
    assert await _call(port, "Run") == b"ok:req"
    await _flush(provider)

    assert [r.path for r in collector.received] == ["/v1/traces"]
    received = collector.received[0]
    assert received.headers["content-type"] == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(received.body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "manager"
    assert resource["host.id"] == INSTANCE_ID
    spans = {s.name: s for scope in resource_spans.scope_spans for s in scope.spans}
    assert set(spans) == {f"{SERVICE}/Run", "validate", "start QEMU"}
    server = spans[f"{SERVICE}/Run"]
    assert server.trace_id == TRACE_ID.to_bytes(16, "big")
    assert server.parent_span_id == CALLER_SPAN_ID.to_bytes(8, "big")
    assert server.kind == OtlpSpan.SPAN_KIND_SERVER
    assert server.trace_state == "vendor=value"
    attributes = {a.key: a.value for a in server.attributes}
    assert attributes["rpc.method"].string_value == "Run"
    assert attributes["rpc.grpc.status_code"].int_value == 0
    for child_name in ("validate", "start QEMU"):
        child = spans[child_name]
        assert child.trace_id == server.trace_id
        assert child.parent_span_id == server.span_id
        assert child.kind == OtlpSpan.SPAN_KIND_INTERNAL


async def test_otlp_url_without_a_path_gets_v1_traces(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector.status = 200
    provider = _tracing(monkeypatch, collector.url(""), set_global=False)
    with provider.get_tracer("test").start_as_current_span("alone"):
        pass
    await _flush(provider)
    assert [r.path for r in collector.received] == ["/v1/traces"]


async def test_credentials_in_the_url_become_basic_auth(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://jaeger:s%40cret@127.0.0.1:{collector.port}/api/traces"
    provider = _tracing(monkeypatch, url, set_global=False)
    with provider.get_tracer("test").start_as_current_span("alone"):
        pass
    await _flush(provider)
    (received,) = collector.received
    assert received.headers["authorization"] == "Basic amFlZ2VyOnNAY3JldA=="


# --- collectors that are down or slow -----------------------------------------------------


@pytest.mark.parametrize("path", ["/api/traces", "/v1/traces"])
async def test_an_outage_is_logged_once_and_so_is_the_recovery(
    path: str,
    monkeypatch: pytest.MonkeyPatch,
    server_for: Any,
    log_lines: io.StringIO,
) -> None:
    port = _free_port()  # nobody listens here (yet)
    url = f"http://127.0.0.1:{port}{path}"
    provider = _tracing(
        monkeypatch, url, export_timeout=0.5, probe_interval=0.2, schedule_delay_millis=20
    )
    grpc_port = await server_for(provider)

    async def calls(count: int) -> None:
        for _ in range(count):
            assert await _call(grpc_port, "Run") == b"ok:req"
            await asyncio.sleep(0.05)

    await calls(15)  # several export attempts fail meanwhile
    await _flush(provider)
    await asyncio.sleep(0.3)
    await calls(3)
    await _flush(provider)
    failures = _messages(log_lines, "trace export failed")
    assert len(failures) == 1, failures
    assert failures[0]["level"] == "warn"
    assert failures[0]["url"] == url
    assert failures[0]["error"]
    # One clear line: where, what happens to spans, and how to turn tracing off.
    assert url in failures[0]["message"] and "COCOS_JAEGER_URL=off" in failures[0]["message"]

    # The collector comes up: the recovery is logged once, spans arrive again.
    collector = Collector(port=port, status=200)
    try:
        await asyncio.sleep(0.3)  # past the probe interval
        await calls(1)
        await _flush(provider)
        assert collector.received
        recoveries = _messages(log_lines, "trace export works again")
        assert len(recoveries) == 1
        assert recoveries[0]["dropped_spans"] > 0
    finally:
        collector.close()

    # It goes down again: a new outage, logged once more.
    await asyncio.sleep(0.3)
    await calls(3)
    await _flush(provider)
    await calls(3)
    await _flush(provider)
    assert len(_messages(log_lines, "trace export failed")) == 2
    assert await asyncio.to_thread(shutdown_tracing, provider, 5.0)


class BlackHole:
    """A collector that takes connections and requests and never answers; it says how many
    requests it holds, and how many of those their sender has given up on (closed)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self.requests = 0
        self.abandoned = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._hold, args=(connection,), daemon=True).start()

    def _hold(self, connection: socket.socket) -> None:
        first = True
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            with self._lock:
                if not data:
                    self.abandoned += 1
                    return
                if first:
                    self.requests += 1
                    first = False

    def held(self) -> int:
        with self._lock:
            return self.requests - self.abandoned

    def close(self) -> None:
        """Shut down, not only closed: a socket closed while a thread waits on it wakes nobody
        and sends no FIN, so the exporter would stay held for its whole timeout."""
        with self._lock:
            held = list(self._connections)
        for sock in [self._listener, *held]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


async def test_calls_are_answered_and_shutdown_returns_while_a_collector_holds_an_export(
    black_hole: BlackHole,
    monkeypatch: pytest.MonkeyPatch,
    server_for: Any,
    log_lines: io.StringIO,
) -> None:
    """Proven by order, not by a clock: every call is answered, and shutdown returns, while
    the collector holds an export unanswered (its timeout is longer than the test). How long
    a call takes beside a slow collector is the bench's to measure, not a test's."""
    provider = _tracing(
        monkeypatch,
        f"http://127.0.0.1:{black_hole.port}/api/traces",
        export_timeout=120.0,
        schedule_delay_millis=10,
    )
    port = await server_for(provider)
    assert await _call(port, "Run") == b"ok:req"
    await wait_for(lambda: black_hole.held() == 1, "an export held by the collector")
    for _ in range(20):  # the export thread is stuck on the collector all along
        assert await _call(port, "Run") == b"ok:req"
    assert black_hole.held() == 1, "the export ended: the calls did not overlap it"
    with trace.get_tracer("test").start_as_current_span("queued at shutdown"):
        pass
    finished = await asyncio.to_thread(shutdown_tracing, provider, 0.5)
    assert not finished
    assert black_hole.held() == 1, "shutdown returned only once the export had ended"
    assert _messages(log_lines, "trace export did not finish at shutdown")


async def test_shutdown_exports_what_is_queued(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = _tracing(monkeypatch, collector.url("/api/traces"), schedule_delay_millis=60_000)
    with trace.get_tracer("test").start_as_current_span("last words"):
        pass
    assert await asyncio.to_thread(shutdown_tracing, provider)
    _, spans = _jaeger_spans(collector)
    assert [span.operationName for span in spans] == ["last words"]


# --- tracing off ----------------------------------------------------------------------------


async def test_tracing_off_exports_nothing_and_says_so(
    monkeypatch: pytest.MonkeyPatch, server_for: Any, collector: Collector, log_lines: io.StringIO
) -> None:
    from cocos_manager.telemetry.tracing import describe_tracing

    provider = _tracing(monkeypatch, "off", schedule_delay_millis=20)
    assert ServiceSettings().JAEGER_URL == "off"
    assert describe_tracing("off") == "off"
    grpc_port = await server_for(provider)
    assert await _call(grpc_port, "Run") == b"ok:req"
    await _flush(provider)
    assert collector.received == []
    assert log_lines.getvalue() == ""  # no exporter, so no outage to report either
    assert await asyncio.to_thread(shutdown_tracing, provider, 5.0)


def test_describe_tracing_hides_credentials() -> None:
    from cocos_manager.telemetry.tracing import describe_tracing

    assert describe_tracing("http://u:secret@collector:14268/api/traces") == (
        "http://collector:14268/api/traces (jaeger.thrift)"
    )
    assert describe_tracing("http://collector:4318/v1/traces").endswith("(OTLP/HTTP)")
