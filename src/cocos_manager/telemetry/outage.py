"""Keeps a collector outage out of the RPCs and out of the log's volume: while the collector
is down, batches are dropped without being sent, except one probe every OUTAGE_PROBE_INTERVAL
seconds, and the outage is logged once when it starts and once when it ends, never per span.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from cocos_manager.telemetry.logging import get_logger

OUTAGE_PROBE_INTERVAL = 5.0


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


OTLP_MESSAGES = _Messages()


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
