"""Spans of the manager, delivered in the protocol that COCOS_JAEGER_URL speaks.

A URL whose path ends in /api/traces is Jaeger's collector endpoint for jaeger.thrift over
HTTP (the original's default, http://localhost:14268/api/traces); any other URL is taken to be
an OTLP/HTTP endpoint (protobuf). The deprecated opentelemetry-exporter-jaeger packages do
not import with current SDKs, so the thrift exporter is written here against jaeger.thrift.

Export runs on the BatchSpanProcessor's thread: RPCs only append to its queue. A collector
that is down or slow costs each export at most EXPORT_TIMEOUT seconds on that thread, and
while it stays down batches are dropped without being sent, except one probe every
OUTAGE_PROBE_INTERVAL seconds, so the queue never backs up into the RPCs. An outage is logged
once when it starts and once when it ends, never per span.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from thriftpy2 import load_fp
from thriftpy2.utils import serialize

from cocos_manager.logging import get_logger
from cocos_manager.settings import ServiceSettings, tracing_off

SERVICE_NAME = "manager"
EXPORT_TIMEOUT = 5.0
OUTAGE_PROBE_INTERVAL = 5.0
SCHEDULE_DELAY_MILLIS = 1000
SHUTDOWN_TIMEOUT = 5.0

JAEGER_PATH = "/api/traces"
OTLP_DEFAULT_PATH = "/v1/traces"
THRIFT_CONTENT_TYPE = "application/x-thrift"

# The OTLP exporter logs every failed export (and every retry); the outage guard reports
# instead, so those records are captured for their text and not printed.
_OTLP_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


@cache
def jaeger_thrift() -> ModuleType:
    """The jaeger.thrift IDL shipped in this package, loaded as a thriftpy2 module."""
    source = resources.files("cocos_manager").joinpath("jaeger.thrift")
    return load_fp(io.StringIO(source.read_text(encoding="utf-8")), module_name="jaeger_thrift")


def _i64(value: int) -> int:
    """Thrift's i64 is signed; Jaeger reads 64-bit ids as their two's-complement bits."""
    return value - _U64 if value > _I64_MAX else value


def _tag(key: str, value: object) -> Any:
    jaeger = jaeger_thrift()
    tag_type = jaeger.TagType
    if isinstance(value, bool):
        return jaeger.Tag(key=key, vType=tag_type.BOOL, vBool=value)
    if isinstance(value, int) and -_I64_MAX - 1 <= value <= _I64_MAX:
        return jaeger.Tag(key=key, vType=tag_type.LONG, vLong=value)
    if isinstance(value, float):
        return jaeger.Tag(key=key, vType=tag_type.DOUBLE, vDouble=value)
    if isinstance(value, bytes):
        return jaeger.Tag(key=key, vType=tag_type.BINARY, vBinary=value)
    if isinstance(value, str):
        return jaeger.Tag(key=key, vType=tag_type.STRING, vStr=value)
    if isinstance(value, Sequence):
        return jaeger.Tag(key=key, vType=tag_type.STRING, vStr=json.dumps(list(value), default=str))
    return jaeger.Tag(key=key, vType=tag_type.STRING, vStr=str(value))


def _tags(attributes: Mapping[str, object] | None) -> list[Any]:
    return [_tag(key, value) for key, value in (attributes or {}).items()]


_KIND_TAGS = {
    SpanKind.SERVER: "server",
    SpanKind.CLIENT: "client",
    SpanKind.PRODUCER: "producer",
    SpanKind.CONSUMER: "consumer",
}


def _span_tags(span: ReadableSpan) -> list[Any]:
    tags = _tags(span.attributes)
    if span.kind in _KIND_TAGS:
        tags.append(_tag("span.kind", _KIND_TAGS[span.kind]))
    if span.status.status_code is StatusCode.ERROR:
        tags.append(_tag("error", True))
        tags.append(_tag("otel.status_code", "ERROR"))
        if span.status.description:
            tags.append(_tag("otel.status_description", span.status.description))
    elif span.status.status_code is StatusCode.OK:
        tags.append(_tag("otel.status_code", "OK"))
    scope = span.instrumentation_scope
    if scope is not None:
        tags.append(_tag("otel.scope.name", scope.name))
        if scope.version:
            tags.append(_tag("otel.scope.version", scope.version))
    return tags


def jaeger_span(span: ReadableSpan) -> Any:
    """One OTel span as a jaeger.thrift Span (times in microseconds, ids split in halves)."""
    jaeger = jaeger_thrift()
    context = span.get_span_context()
    assert context is not None
    start = span.start_time or 0
    end = span.end_time or start
    references = [
        jaeger.SpanRef(
            refType=jaeger.SpanRefType.FOLLOWS_FROM,
            traceIdLow=_i64(link.context.trace_id % _U64),
            traceIdHigh=_i64(link.context.trace_id >> 64),
            spanId=_i64(link.context.span_id),
        )
        for link in span.links
    ]
    logs = [
        jaeger.Log(
            timestamp=event.timestamp // 1000,
            fields=[_tag("event", event.name), *_tags(event.attributes)],
        )
        for event in span.events
    ]
    return jaeger.Span(
        traceIdLow=_i64(context.trace_id % _U64),
        traceIdHigh=_i64(context.trace_id >> 64),
        spanId=_i64(context.span_id),
        parentSpanId=_i64(span.parent.span_id) if span.parent is not None else 0,
        operationName=span.name,
        references=references or None,
        flags=1 if context.trace_flags.sampled else 0,
        startTime=start // 1000,
        duration=(end - start) // 1000,
        tags=_span_tags(span),
        logs=logs or None,
    )


def jaeger_process(resource: Resource) -> Any:
    attributes = dict(resource.attributes)
    service = str(attributes.pop("service.name", SERVICE_NAME))
    return jaeger_thrift().Process(serviceName=service, tags=_tags(attributes))


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """The URL without user:password, and the Basic authorization header they stand for."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, {}
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    header = {"Authorization": "Basic " + base64.b64encode(token).decode()}
    return urlunsplit(parts._replace(netloc=netloc)), header


class JaegerThriftExporter(SpanExporter):
    """POSTs each batch as one jaeger.thrift Batch (binary protocol) to the collector's URL."""

    def __init__(
        self, url: str, timeout: float = EXPORT_TIMEOUT, headers: Mapping[str, str] | None = None
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._headers = {"Content-Type": THRIFT_CONTENT_TYPE, **(headers or {})}
        self.last_error: str | None = None

    def encode(self, spans: Sequence[ReadableSpan]) -> list[bytes]:
        """One serialized Batch per resource (a Batch has one Process)."""
        by_resource: dict[int, tuple[Resource, list[ReadableSpan]]] = {}
        for span in spans:
            by_resource.setdefault(id(span.resource), (span.resource, []))[1].append(span)
        jaeger = jaeger_thrift()
        return [
            serialize(
                jaeger.Batch(
                    process=jaeger_process(resource),
                    spans=[jaeger_span(span) for span in group],
                )
            )  # thriftpy2's default protocol is the binary one the collector reads
            for resource, group in by_resource.values()
        ]

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self._url, data=body, headers=self._headers, method="POST")
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            response.read()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            for body in self.encode(spans):
                self._post(body)
        except urllib.error.HTTPError as error:
            self.last_error = f"HTTP {error.code} {error.reason}"
            return SpanExportResult.FAILURE
        except urllib.error.URLError as error:
            self.last_error = str(error.reason)
            return SpanExportResult.FAILURE
        except (OSError, ValueError) as error:
            self.last_error = f"{type(error).__name__}: {error}"
            return SpanExportResult.FAILURE
        self.last_error = None
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing is held open between exports."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _Messages(logging.Filter):
    """Keeps the text of the records it swallows, as the reason of a failed export."""

    def __init__(self) -> None:
        super().__init__()
        self._messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message not in self._messages and len(self._messages) < 5:
            self._messages.append(message)
        return False

    def take(self) -> str | None:
        messages, self._messages = self._messages, []
        return "; ".join(messages)[:1000] or None


_OTLP_MESSAGES = _Messages()


class OutageGuard(SpanExporter):
    """Wraps an exporter: reports an outage once, and stops sending while it lasts."""

    def __init__(
        self,
        inner: SpanExporter,
        url: str,
        reason: Callable[[], str | None],
        probe_interval: float = OUTAGE_PROBE_INTERVAL,
    ) -> None:
        self._inner = inner
        self._url = url
        self._reason = reason
        self._probe_interval = probe_interval
        self._lock = threading.Lock()
        self._down = False
        self._next_probe = 0.0
        self._dropped = 0
        self._shut_down = False
        self._log = get_logger()

    @property
    def inner(self) -> SpanExporter:
        return self._inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._down and time.monotonic() < self._next_probe:
                self._dropped += len(spans)
                return SpanExportResult.FAILURE
            try:
                result = self._inner.export(spans)
                reason = self._reason()  # taken every time, so no stale text lingers
                error = None if result is SpanExportResult.SUCCESS else reason
            except Exception as exc:  # an exporter bug must not kill the export thread
                result, error = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
            if result is SpanExportResult.SUCCESS:
                if self._down:
                    self._log.info(
                        "trace export works again",
                        url=self._url,
                        dropped_spans=self._dropped,
                    )
                    self._down, self._dropped = False, 0
                return result
            self._dropped += len(spans)
            self._next_probe = time.monotonic() + self._probe_interval
            if not self._down and not self._shut_down:  # after shutdown nobody is listening
                self._down = True
                self._log.warning(
                    f"trace export failed: the collector at {self._url} does not take spans;"
                    " they are dropped until it answers (logged once per outage;"
                    " COCOS_JAEGER_URL=off turns tracing off)",
                    url=self._url,
                    error=error or "the collector did not accept the spans",
                )
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        # Called by the processor and, when it hangs, by shutdown_tracing: once is enough.
        if not self._shut_down:
            self._shut_down = True
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def describe_tracing(url: str) -> str:
    """Where spans go, for the start-up line: never the credentials of the URL."""
    if tracing_off(url):
        return "off"
    bare, _ = _split_credentials(url)
    kind = "jaeger.thrift" if is_jaeger_url(bare) else "OTLP/HTTP"
    return f"{bare} ({kind})"


def is_jaeger_url(url: str) -> bool:
    return urlsplit(url).path.rstrip("/").endswith(JAEGER_PATH)


def make_exporter(
    url: str, timeout: float = EXPORT_TIMEOUT, probe_interval: float = OUTAGE_PROBE_INTERVAL
) -> OutageGuard:
    """The exporter COCOS_JAEGER_URL calls for, wrapped in the outage guard.

    An OTLP URL with no path gets the standard /v1/traces. user:password in the URL becomes a
    Basic authorization header (collectors behind a proxy), never part of a logged URL.
    """
    bare_url, headers = _split_credentials(url)
    if is_jaeger_url(bare_url):
        jaeger = JaegerThriftExporter(bare_url, timeout=timeout, headers=headers)
        return OutageGuard(jaeger, bare_url, lambda: jaeger.last_error, probe_interval)
    parts = urlsplit(bare_url)
    if parts.path in ("", "/"):
        bare_url = urlunsplit(parts._replace(path=OTLP_DEFAULT_PATH))
    # Imported here: it pulls in requests and urllib3, which the default Jaeger URL never uses.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    logging.getLogger(_OTLP_LOGGER).addFilter(_OTLP_MESSAGES)  # idempotent
    otlp = OTLPSpanExporter(endpoint=bare_url, timeout=timeout, headers=headers)
    return OutageGuard(otlp, bare_url, _OTLP_MESSAGES.take, probe_interval)


_GUARDS: weakref.WeakKeyDictionary[TracerProvider, OutageGuard] = weakref.WeakKeyDictionary()


def setup_tracing(
    service: ServiceSettings,
    instance_id: str,
    *,
    set_global: bool = True,
    export_timeout: float = EXPORT_TIMEOUT,
    probe_interval: float = OUTAGE_PROBE_INTERVAL,
    schedule_delay_millis: int = SCHEDULE_DELAY_MILLIS,
) -> TracerProvider:
    """A provider exporting to service.JAEGER_URL; by default also the global provider.

    Being global lets any module take a tracer with opentelemetry.trace.get_tracer(__name__)
    and have its spans exported, as children of the RPC's server span. The provider does not
    flush at interpreter exit on its own (that could hang on a dead collector): call
    shutdown_tracing.
    """
    resource = Resource.create({"service.name": SERVICE_NAME, "host.id": instance_id})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if tracing_off(service.JAEGER_URL):
        # Spans are still made (trace context flows on to callers) but go nowhere.
        if set_global:
            trace.set_tracer_provider(provider)
        return provider
    exporter = make_exporter(service.JAEGER_URL, export_timeout, probe_interval)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_millis)
    )
    _GUARDS[provider] = exporter
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider: TracerProvider, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
    """Exports what is queued and stops; gives up after `timeout` seconds. True if it finished.

    Blocking: from the event loop call it as `await asyncio.to_thread(shutdown_tracing, p)`.
    The SDK's own shutdown waits up to 30 s per processor, so it runs on a thread of its own
    and is abandoned (the export thread is a daemon) when the collector is slower than that.
    """
    worker = threading.Thread(target=provider.shutdown, name="trace-shutdown", daemon=True)
    worker.start()
    worker.join(timeout)
    if not worker.is_alive():
        return True
    guard = _GUARDS.get(provider)
    if guard is not None:
        guard.shutdown()  # interrupts the OTLP exporter's retry back-off
    get_logger().warning(
        "trace export did not finish at shutdown; queued spans are dropped", timeout=timeout
    )
    return False
