"""A span exporter that speaks jaeger.thrift over HTTP to Jaeger's collector endpoint (the
original's default, http://localhost:14268/api/traces).

The deprecated opentelemetry-exporter-jaeger packages do not import with current SDKs, so the
thrift exporter is written here against the jaeger.thrift IDL shipped in this package.
"""

from __future__ import annotations

import io
import json
import urllib.error
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from types import ModuleType
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

SERVICE_NAME = "manager"
EXPORT_TIMEOUT = 5.0
THRIFT_CONTENT_TYPE = "application/x-thrift"

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


@cache
def jaeger_thrift() -> ModuleType:
    """The jaeger.thrift IDL shipped in this package, loaded as a thriftpy2 module.

    thriftpy2 (its IDL parser, protocols and transports: about 40 modules) is imported here,
    on the export thread at the first export, not at the daemon's start-up (docs/decisions.md,
    "Start-up and the bench's targets")."""
    from thriftpy2 import load_fp

    source = resources.files("cocos_manager.telemetry").joinpath("jaeger.thrift")
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
        from thriftpy2.utils import serialize  # loaded by jaeger_thrift() above

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
        import urllib.request  # http.client and friends: on the export thread, when first used

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
