"""The daemon's life: `DaemonRunner.setup()` / `start()` / `cleanup()`, then `run_daemon` serves
until SIGTERM/SIGINT. The same runner serves `main`, the in-process test harness and the
benchmarks, so tests run the production wiring (interceptors, agent listener, metrics).

Shutdown order: tell systemd, tell Events subscribers (`manager-shutdown`), refuse new Runs,
stop every VM as Stop does (unless told to leave them for the next start) while the server
still answers, so subscribers get every vm-stop; then end Events streams (`manager-shutdown`
`complete` last) and Logs followers, let in-flight calls finish (bounded), flush traces.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import TracerProvider

from cocos_manager.agent import AgentEventListener, Connect, vsock_connector
from cocos_manager.api import Server, TelemetryInterceptor, build_server, listen_address
from cocos_manager.check import StartupRefusedError, log_startup_warnings, refuse_startup
from cocos_manager.config import (
    AgentChannel,
    Settings,
    TlsConfigError,
    TlsMode,
    describe_mode,
    server_credentials,
)
from cocos_manager.errors import ManagerError
from cocos_manager.events import EventBus
from cocos_manager.host import (
    StateDirLockedError,
    grpc_listen_refusal,
    hold_state_lock,
    raise_session_weight,
)
from cocos_manager.qemu import effective_base_args, resolve_executable, shell_line
from cocos_manager.service import ManagerService
from cocos_manager.telemetry import (
    METRICS,
    READY,
    STOPPING,
    MetricsServer,
    MetricsServerError,
    VmCollector,
    configure_logging,
    describe_tracing,
    get_logger,
    metrics_host,
    notify,
    register_vm_metrics,
    setup_tracing,
    shutdown_tracing,
    start_metrics_server,
    unregister_vm_metrics,
)

if TYPE_CHECKING:
    from cocos_manager.api import DialOut

SHUTDOWN_GRACE = 10.0


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


class DaemonRunner:
    """Builds the daemon from settings, serves it, and takes it down again.

    `cleanup()` undoes whatever `setup()` got to, so a start-up that fails half-way leaves
    nothing running either.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        agent_connector: Callable[[int], Connect] = vsock_connector,
        shutdown_grace: float = SHUTDOWN_GRACE,
        tracer_provider: TracerProvider | None = None,
        dial_out: bool = True,
        freeze_start_up: bool = False,
    ) -> None:
        """`tracer_provider`: one the caller owns (tests keep one for the whole session, since
        OpenTelemetry's global provider can be set only once); otherwise the runner makes one
        from COCOS_JAEGER_URL and shuts it down in cleanup(). `dial_out=False`: no dial-out even
        with MANAGER_GRPC_URL set (tests that make their own, with metrics of their own).
        `freeze_start_up`: what was made until recovery is frozen out of the collector's passes
        (run_daemon)."""
        self._dial_out = dial_out
        self._freeze_start_up = freeze_start_up
        self.settings = settings
        self._agent_connector = agent_connector
        self._grace = shutdown_grace
        self.log = get_logger()
        self.provider = tracer_provider
        self._owns_provider = tracer_provider is None
        self.bus = EventBus.from_settings(settings.service, on_drop=METRICS.events_dropped.inc)
        self.service: ManagerService | None = None
        self.server: Server | None = None
        self.metrics: MetricsServer | None = None
        self.vm_collector: VmCollector | None = None
        self.agents: AgentEventListener | None = None
        self.dialout: DialOut | None = None
        self._mode = TlsMode.PLAINTEXT

    async def setup(self) -> None:
        settings = self.settings
        executable = resolve_executable(settings.qemu)
        self.log.info(shell_line(executable.command(effective_base_args(settings.qemu))))
        # Each finding once, naming the setting and the fix (check.py).
        log_startup_warnings(settings, self.log)
        try:  # what `cocos-manager check` fails, by the same code (check.STARTUP_REFUSALS)
            refuse_startup(settings)
        except StartupRefusedError as error:
            raise StartupError(str(error)) from None
        try:
            self._mode, credentials = server_credentials(settings.service)
        except TlsConfigError as error:
            raise StartupError(str(error)) from None
        if self.provider is None:
            self.provider = setup_tracing(settings.service, settings.instance_id)
        service = ManagerService(settings, executable, self.bus, self._agent_connector)
        self.service = service
        if settings.service.METRICS_PORT is not None:  # read at scrape time, by /metrics only
            self.vm_collector = register_vm_metrics(service.vm_pids)
        # Made before recovery so re-adoptions are forwarded too (MANAGER_GRPC_URL).
        # Its settings were checked with the others (refuse_startup); its code (client, buffer,
        # request decoding) is loaded only when there is a computations server to dial.
        if self._dial_out and settings.service.GRPC_URL.strip():
            from cocos_manager.api import DialOut, DialOutConfigError

            try:
                self.dialout = DialOut.configure(settings.service, service)
            except DialOutConfigError as error:
                raise StartupError(str(error)) from None
        if self._freeze_start_up:
            # Before recovery, not after: an adopted VM's objects (its Machine, process, console)
            # hold reference cycles and end with the VM, while the daemon serves; frozen, they
            # would never be collected (every VM adopted at start kept for the daemon's life).
            gc.freeze()
        try:
            await service.recover()
        except ManagerError as error:
            raise StartupError(str(error)) from None
        host, port = settings.service.GRPC_HOST, settings.service.GRPC_PORT
        try:
            self.server = await build_server(
                service,
                host,
                port,
                credentials=credentials,
                interceptors=[TelemetryInterceptor(self.provider)],
            )
        except RuntimeError as error:
            raise StartupError(grpc_listen_refusal(host, port, error)) from None
        try:
            self.metrics = await start_metrics_server(
                settings.service.METRICS_PORT, metrics_host(settings.service)
            )
        except MetricsServerError as error:
            raise StartupError(str(error)) from None
        if settings.qemu.AGENT_CHANNEL is AgentChannel.VSOCK:
            agents = AgentEventListener(
                service.computation_for_cid,
                service.publish_agent_message,
                pace=self.bus.pace,
                max_per_cid=settings.service.AGENT_MAX_CONNECTIONS_PER_CID,
            )
            self.agents = agents
            await agents.start()
            service.ctx.end_agents = agents.finish  # awaited before each final event
            service.on_release(agents.disconnect)

    @property
    def address(self) -> str:
        assert self.server is not None
        return listen_address(self.settings.service.GRPC_HOST, self.server.port)

    async def start(self) -> None:
        assert self.server is not None
        await self.server.grpc.start()
        await self.server.set_serving(True)
        metrics_url = (
            f"http://{listen_address(self.metrics.host, self.metrics.port)}/metrics"
            if self.metrics is not None
            else "off"
        )
        traces = describe_tracing(self.settings.service.JAEGER_URL)
        self.log.info(
            f"manager service gRPC server listening at {self.address} "
            f"{describe_mode(self._mode, self.settings.service)}; metrics {metrics_url}; "
            f"traces {traces}",
            instance_id=self.settings.instance_id,
            grpc=self.address,
            metrics=metrics_url,
            traces=traces,
        )
        if self.dialout is not None:
            self.dialout.start(self.server.health)
        notify(READY)

    async def cleanup(self) -> None:
        notify(STOPPING)
        self.log.info("manager shutting down")
        if self.service is not None:
            self.service.begin_shutdown()
        if self.server is not None:
            await self.server.set_serving(False)
        # The VMs are stopped while the server still serves: Events streams get every VM's
        # vm-stop, Logs followers see their VM end, and none of them holds the stop back (a
        # new Run meanwhile is refused with UNAVAILABLE; Stop, List, Events still answer).
        if self.service is not None:
            await self.service.shutdown(stop_vms=self.settings.service.SHUTDOWN_STOPS_VMS)
            if self.agents is not None:
                # Before the streams end: an agent of a VM left running must not be acked
                # for messages no stream will carry (unacked, it sends them to the next start).
                await self.agents.close()
            self.service.end_streams()
        else:
            self.bus.close()
        if self.server is not None:
            # Streams send what they have queued, then end; only a client that stops
            # reading keeps its stream (not the VMs) past this grace.
            await self.server.grpc.stop(self._grace)
        if self.dialout is not None:  # after the VMs stopped, so that goes up the stream too
            await self.dialout.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.vm_collector is not None:
            unregister_vm_metrics(self.vm_collector)
            self.vm_collector = None
        if self.provider is not None and self._owns_provider:
            await asyncio.to_thread(shutdown_tracing, self.provider)
        self.log.info("manager stopped")


NOTED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
"""Signals whose default action ends a process silently (and systemd's `Restart=on-failure`
takes a death by SIGHUP for a clean stop: no restart): logged and ignored.
Handled, not ignored (SIG_IGN), so QEMU's exec resets them to their defaults."""


def note_signal(sig: signal.Signals) -> None:
    """SIGHUP asks daemons to reload; this one reads its settings at start only (a reload
    could not apply most of them to running VMs, and its log goes to stdout: nothing to
    reopen). Saying so is what an operator who sent it needs."""
    if sig is signal.SIGHUP:
        get_logger().warning(
            "SIGHUP received and ignored: settings are read at start only; restart the service "
            "to apply changes (with MANAGER_SHUTDOWN_STOPS_VMS=false the VMs run on across it)",
            signal=sig.name,
        )
    else:
        get_logger().warning(
            f"{sig.name} received and ignored: it means nothing to this daemon", signal=sig.name
        )


def settle_start_up_heap() -> None:
    """What start-up built before recovery (modules, classes, schemas, the service) lives as
    long as the daemon and was frozen by `setup` (the collector never walks it again); the
    collector, held off by `main` while all that was made, runs from here on, for what the
    daemon makes while it serves, the VMs adopted at start included."""
    gc.enable()


async def run_daemon(settings: Settings) -> int:
    configure_logging(settings.service.LOG_LEVEL, log_format=settings.service.LOG_FORMAT)
    # One daemon per state directory (host/state_lock.py), before recovery or anything else.
    try:
        hold_state_lock(settings)  # held until this process exits
    except StateDirLockedError as error:
        raise StartupError(str(error)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # First of all, so a SIGTERM during a long recovery still shuts down cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for sig in NOTED_SIGNALS:  # by default these end a process without a word
        loop.add_signal_handler(sig, note_signal, sig)
    weight = raise_session_weight(settings.service.AUTOGROUP_NICE)
    if weight.operator_action:
        get_logger().warning("scheduling weight not raised: " + weight.detail)
    else:
        get_logger().info("scheduling weight: " + weight.detail, applied=weight.applied)
    runner = DaemonRunner(settings, freeze_start_up=True)
    try:
        await runner.setup()
        settle_start_up_heap()
        if not stop.is_set():
            await runner.start()
            await stop.wait()
    finally:
        await runner.cleanup()
    return 0
