"""The daemon's life: configure, serve until SIGTERM/SIGINT, then shut down cleanly.

Shutdown order: tell systemd, refuse new Runs, end Events streams, let in-flight calls finish
(bounded), stop every VM as Stop does (unless told to leave them for the next start), flush
traces, exit 0.
"""

from __future__ import annotations

import asyncio
import signal

from cocos_manager.errors import ManagerError
from cocos_manager.events import EventBus
from cocos_manager.host_check import log_startup_warnings
from cocos_manager.interceptors import TelemetryInterceptor
from cocos_manager.logging import configure_logging, get_logger
from cocos_manager.metrics import METRICS, MetricsServerError, start_metrics_server
from cocos_manager.qemu_argv import effective_base_args, resolve_executable, shell_line
from cocos_manager.sdnotify import READY, STOPPING, notify
from cocos_manager.server import build_server, listen_address
from cocos_manager.service import ManagerService
from cocos_manager.settings import AgentChannel, Settings
from cocos_manager.tls import TlsConfigError, describe_mode, server_credentials
from cocos_manager.tracing import describe_tracing, setup_tracing, shutdown_tracing
from cocos_manager.vsock import AgentEventListener

SHUTDOWN_GRACE = 10.0


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


async def run_daemon(settings: Settings) -> int:
    configure_logging(settings.service.LOG_LEVEL)
    log = get_logger()
    executable = resolve_executable(settings.qemu)
    log.info(shell_line(executable.command(effective_base_args(settings.qemu))))
    # -- start-up warnings (host_check.py): each finding once, naming the setting and the fix.
    log_startup_warnings(settings, log)
    # --
    try:
        mode, credentials = server_credentials(settings.service)
    except TlsConfigError as error:
        raise StartupError(str(error)) from None

    provider = setup_tracing(settings.service, settings.instance_id)
    bus = EventBus(on_drop=METRICS.events_dropped.inc)
    service = ManagerService(settings, executable, bus)
    try:
        await service.recover()
    except ManagerError as error:
        raise StartupError(str(error)) from None
    host, port = settings.service.GRPC_HOST, settings.service.GRPC_PORT
    try:
        server = await build_server(
            service,
            host,
            port,
            credentials=credentials,
            interceptors=[TelemetryInterceptor(provider)],
        )
    except RuntimeError as error:
        raise StartupError(
            f"MANAGER_GRPC_HOST/MANAGER_GRPC_PORT: cannot listen on {listen_address(host, port)}: {error}"
        ) from None
    try:
        metrics_server = await start_metrics_server(settings.service.METRICS_PORT, host)
    except MetricsServerError as error:
        raise StartupError(str(error)) from None

    agents: AgentEventListener | None = None
    if settings.qemu.AGENT_CHANNEL is AgentChannel.VSOCK:
        agents = AgentEventListener(
            service.computation_for_cid, service.publish_agent_message, pace=bus.wait_for_room
        )
        await agents.start()
        service.on_release(lambda cid: agents.disconnect(cid) if agents else 0)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await server.grpc.start()
    await server.set_serving(True)
    grpc_address = listen_address(host, server.port)
    metrics_url = (
        f"http://{listen_address(metrics_server.host, metrics_server.port)}/metrics"
        if metrics_server is not None
        else "off"
    )
    traces = describe_tracing(settings.service.JAEGER_URL)
    log.info(
        f"manager service gRPC server listening at {grpc_address} "
        f"{describe_mode(mode, settings.service)}; metrics {metrics_url}; traces {traces}",
        instance_id=settings.instance_id,
        grpc=grpc_address,
        metrics=metrics_url,
        traces=traces,
    )
    notify(READY)
    await stop.wait()

    notify(STOPPING)
    log.info("manager shutting down")
    service.begin_shutdown()
    await server.set_serving(False)
    bus.close()
    await server.grpc.stop(SHUTDOWN_GRACE)
    await service.shutdown(stop_vms=settings.service.SHUTDOWN_STOPS_VMS)
    if agents is not None:
        await agents.close()
    if metrics_server is not None:
        await metrics_server.close()
    await asyncio.to_thread(shutdown_tracing, provider)
    log.info("manager stopped")
    return 0
