"""Prometheus metrics of the manager, served at /metrics when MANAGER_METRICS_PORT is set.

The metrics live on their own registry rather than prometheus-client's global one, so that
only the manager's series are exposed (no process_* or python_* collectors a library might
register) and tests can make a fresh set. The service layer records through `METRICS`:

    METRICS.vms_running.set(len(vms))                      # after every start and exit
    METRICS.run_failures.labels(reason="qemu_exited").inc()
    METRICS.events_dropped.inc()                           # a slow subscriber lost an event
    METRICS.agent_messages.inc()                           # one frame received from an agent

Reasons are a small fixed vocabulary (RUN_FAILURE_REASONS); a free-form message as a label
value would create a series per message.

The series are kept as plain numbers (series.py) and prometheus-client is loaded when
`registry` is first read (by /metrics, `check`, a test): a daemon without MANAGER_METRICS_PORT
never loads it.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cocos_manager.config import ServiceSettings
from cocos_manager.telemetry.series import Counter, Gauge, Histogram, Series, SeriesCollector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

# Run can take as long as a VM boot (MANAGER_QEMU_START_TIMEOUT, 60 s by default).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RUN_FAILURE_REASONS = (
    "invalid_argument",  # the request did not validate, or named a computation it could not
    "resource_exhausted",  # MANAGER_MAX_VMS reached, no free port/CID/display, disk full
    "unavailable",  # the daemon is shutting down
    "files",  # a host file or tool is missing or unusable (image, TMP_FILE_LOC, sudo)
    "qemu_exited",  # QEMU exited before the VM was handed to the client
    "start_timeout",  # QEMU or the agent did not become ready in time
    "handover_failed",  # the manifest could not be handed to the agent, and retrying cannot help
    "cancelled",  # the client went away or a Stop overtook the Run
    "internal",  # anything else
)


class MetricsServerError(Exception):
    """The metrics port cannot be served; start-up stops with this one line."""


class Metrics:
    """The manager's series; one instance per registry. Only the manager's series are exported
    (no *_created gauges, no process_* or python_* collectors a library might register)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = registry
        self._exported = False
        self.requests = Counter(
            "manager_requests",
            "gRPC requests handled, by method and status code.",
            ("method", "code"),
        )
        self.request_duration = Histogram(
            "manager_request_duration_seconds",
            "Time from a request's arrival to its status, by method and status code.",
            ("method", "code"),
            buckets=DURATION_BUCKETS,
        )
        self.vms_running = Gauge("manager_vms_running", "VMs whose QEMU process is running.")
        self.run_failures = Counter(
            "manager_run_failures",
            "Run requests that did not leave a running VM, by reason.",
            ("reason",),
        )
        self.events_dropped = Counter(
            "manager_events_dropped",
            "Events not delivered to a subscriber that could not keep up.",
        )
        self.agent_messages = Counter(
            "manager_agent_messages",
            "Messages (events and logs) received from agents.",
        )
        self.agent_messages_late = Counter(
            "manager_agent_messages_late",
            "Agent messages dropped because they came after their VM's final event.",
        )
        # -- dial-out to a computations server (api/dialout.py) --
        # Made here, registered only while a dial-out exists (register_dialout): without
        # MANAGER_GRPC_URL there is nothing to be connected to, and a 0 would read as "down".
        self.dialout_connected = Gauge(
            "manager_dialout_connected",
            "1 while the Process stream to MANAGER_GRPC_URL is up, 0 while it is retried.",
        )
        self.dialout_buffered = Gauge(
            "manager_dialout_buffered",
            "Messages waiting to be sent up the Process stream.",
        )
        self.dialout_dropped = Counter(
            "manager_dialout_dropped",
            "Messages for the Process stream lost because its buffer was full.",
        )
        self.dialout_requests = Counter(
            "manager_dialout_requests",
            "Messages received on the Process stream, by outcome (ok, failed, undecodable).",
            ("outcome",),
        )
        self._dialouts = 0

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus-client registry these series are exported through, made (and
        prometheus-client imported) on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry()
        if not self._exported:
            self._registry.register(SeriesCollector(self._shown))
            self._exported = True
        return self._registry

    def register_dialout(self) -> None:
        """A dial-out exists: its series are exported (counted: tests make several)."""
        self._dialouts += 1

    def unregister_dialout(self) -> None:
        self._dialouts -= 1

    def _shown(self) -> tuple[Series, ...]:
        shown: tuple[Series, ...] = (
            self.requests,
            self.request_duration,
            self.vms_running,
            self.run_failures,
            self.events_dropped,
            self.agent_messages,
            self.agent_messages_late,
        )
        if self._dialouts > 0:
            shown += (
                self.dialout_connected,
                self.dialout_buffered,
                self.dialout_dropped,
                self.dialout_requests,
            )
        return shown

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC; called by the telemetry interceptor."""
        self.requests.labels(method=method, code=code).inc()
        self.request_duration.labels(method=method, code=code).observe(seconds)


METRICS = Metrics()


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running /metrics endpoint; `port` is the bound one (useful when asked for port 0)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    async def close(self) -> None:
        """Stops serving; runs in a thread because shutdown() waits for the serve loop."""
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def metrics_host(service: ServiceSettings) -> str:
    """Where /metrics listens: MANAGER_METRICS_HOST, else MANAGER_GRPC_HOST's address (the
    behaviour before the setting existed). Metrics need not share the API's exposure: e.g.
    gRPC on every interface behind TLS, metrics on 127.0.0.1 for a local scraper."""
    return service.METRICS_HOST or service.GRPC_HOST


async def start_metrics_server(
    port: int | None, host: str = "", metrics: Metrics = METRICS
) -> MetricsServer | None:
    """Serves `metrics` over HTTP at /metrics on host:port; None (nothing served) without a port.

    An empty host means every IPv4 interface, like MANAGER_GRPC_HOST. The scrape is answered
    from a thread of prometheus-client, so a busy event loop does not delay it.
    """
    if port is None:
        return None
    return await asyncio.to_thread(_serve, port, host, metrics.registry)


def _serve(port: int, host: str, registry: CollectorRegistry) -> MetricsServer:
    from prometheus_client import start_http_server

    address = host or "0.0.0.0"
    try:
        server, thread = start_http_server(port, address, registry=registry)
    except OSError as error:
        reason = error.strerror or str(error)
        raise MetricsServerError(
            f"MANAGER_METRICS_PORT: cannot serve metrics on {address}:{port}: {reason}"
        ) from None
    bound_port = int(server.server_address[1])
    return MetricsServer(host=address, port=bound_port, _server=server, _thread=thread)


def probe_metrics_listen(port: int | None, host: str = "") -> str:
    """Binds /metrics' address as the daemon does and lets it go, for `cocos-manager check`:
    where it would serve, or MetricsServerError with the daemon's own line."""
    if port is None:
        return "MANAGER_METRICS_PORT unset: no /metrics"
    from prometheus_client import CollectorRegistry

    served = _serve(port, host, CollectorRegistry())
    served._stop()
    return f"/metrics can be served on {served.host}:{port}"
