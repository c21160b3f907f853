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

This module sets tracing up and takes it down; the thrift exporter is in telemetry/jaeger.py,
the outage guard in telemetry/outage.py.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import weakref
from urllib.parse import unquote, urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from cocos_manager.config import ServiceSettings, tracing_off
from cocos_manager.telemetry.jaeger import EXPORT_TIMEOUT, SERVICE_NAME, JaegerThriftExporter
from cocos_manager.telemetry.logging import get_logger
from cocos_manager.telemetry.outage import OTLP_MESSAGES, OUTAGE_PROBE_INTERVAL, OutageGuard

SCHEDULE_DELAY_MILLIS = 1000
SHUTDOWN_TIMEOUT = 5.0

JAEGER_PATH = "/api/traces"
OTLP_DEFAULT_PATH = "/v1/traces"

# The OTLP exporter logs every failed export (and every retry); the outage guard reports
# instead, so those records are captured for their text and not printed.
_OTLP_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


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


def describe_tracing(url: str) -> str:
    """Where spans go, for the start-up line: never the credentials of the URL."""
    if tracing_off(url):
        return "off"
    bare, _ = _split_credentials(url)
    kind = "jaeger.thrift" if is_jaeger_url(bare) else "OTLP/HTTP"
    return f"{bare} ({kind})"


def probe_collector(url: str, timeout: float = 2.0) -> str | None:
    """Why nothing takes connections at the collector's host and port, or None; for
    `cocos-manager check` (the daemon starts either way, and drops spans while it lasts)."""
    parts = urlsplit(_split_credentials(url)[0])
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return f"{host}:{parts.port or ''} does not take connections ({reason})"


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

    logging.getLogger(_OTLP_LOGGER).addFilter(OTLP_MESSAGES)  # idempotent
    otlp = OTLPSpanExporter(endpoint=bare_url, timeout=timeout, headers=headers)
    return OutageGuard(otlp, bare_url, OTLP_MESSAGES.take, probe_interval)


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
