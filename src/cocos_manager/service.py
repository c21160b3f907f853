"""Computations and everything they hold: the service layer behind Run, Stop and Events.

Every state change of the computation table happens synchronously on the event loop, so
checks and reservations (duplicate id, MAX_VMS, port, CID, VNC display) cannot race. Each
computation owns its resources from the moment it is admitted, and a single release path
frees them whichever way it ends: failed start, cancelled Run, Stop, or QEMU exiting on
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace

from cocos_manager.api import manager_pb2 as pb
from cocos_manager.console_log import ConsoleArchive, ConsoleLog
from cocos_manager.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    ManagerError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    VmStartError,
)
from cocos_manager.events import EventBus, Subscription, log_message, manager_event
from cocos_manager.listing import computation_info, started_at_from_ticks
from cocos_manager.logging import get_logger
from cocos_manager.manifest import manifest_json, validate_run_request
from cocos_manager.metrics import METRICS
from cocos_manager.qemu_argv import (
    FW_CFG_MANIFEST_NAME,
    Executable,
    VmResources,
    derive_vm_settings,
    qemu_args,
)
from cocos_manager.qemu_process import ExitInfo, QemuProcess, qmp_args, qmp_listener
from cocos_manager.resources import guest_cid_pool, host_port_pool, vnc_display_pool
from cocos_manager.settings import AgentChannel, QemuSettings, Settings
from cocos_manager.state_store import StateStore, VmRecord
from cocos_manager.vm_files import VmFiles, check_images, prepare_vm_files, vm_paths
from cocos_manager.vsock import Connect, HandoverAborted, send_manifest, vsock_connector

_tracer = trace.get_tracer("cocos_manager.service")
_log = get_logger()

PROVISION = "vm-provision"
STOP = "vm-stop"
EXIT = "vm-exit"
START_ATTEMPTS = 3


def failure_reason(error: BaseException) -> str:
    """A small, fixed set of label values for manager_run_failures_total."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, InvalidArgumentError | AlreadyExistsError | NotFoundError):
        return "invalid_argument"
    if isinstance(error, ResourceExhaustedError | UnavailableError):
        return "resource_exhausted"
    if isinstance(error, FailedPreconditionError):
        return "files"
    if isinstance(error, VmStartError):
        return "start_timeout" if "did not become ready" in str(error) else "qemu_exited"
    return "internal"


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(eq=False)
class Computation:
    id: str
    uuid: str
    resources: VmResources
    state: State = State.STARTING
    files: VmFiles | None = None
    process: QemuProcess | None = None
    launch: asyncio.Task[None] | None = None
    stopped: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    released: bool = False
    # operator queries (stub until Machine): wall-clock seconds; expires_at None = no TTL
    started_at: float | None = field(default_factory=time.time)
    expires_at: float | None = None
    adopted: bool = False


def _escape_opt(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")


def _remove_prepared(preparing: asyncio.Future[VmFiles]) -> None:
    if not preparing.cancelled() and preparing.exception() is None:
        preparing.result().remove()


async def _prepare_files(q: QemuSettings, vm_uuid: str, manifest: bytes | None) -> VmFiles:
    """prepare_vm_files in a worker thread, which a cancelled Run cannot interrupt: on
    cancellation the copies it still makes are removed once it ends, or they would leak into
    TMP_FILE_LOC with no computation left to own them."""
    preparing = asyncio.ensure_future(asyncio.to_thread(prepare_vm_files, q, vm_uuid, manifest))
    try:
        return await asyncio.shield(preparing)
    except asyncio.CancelledError:
        preparing.add_done_callback(_remove_prepared)
        with contextlib.suppress(BaseException):  # normally the release waits for the removal
            await asyncio.shield(preparing)
        raise


class ManagerService:
    def __init__(
        self,
        settings: Settings,
        executable: Executable,
        bus: EventBus,
        agent_connector: Callable[[int], Connect] = vsock_connector,
    ) -> None:
        """`agent_connector` maps a guest CID to a way of reaching its agent (AF_VSOCK here;
        tests give a UNIX socket where no vhost-vsock exists)."""
        self._agent_connector = agent_connector
        self.settings = settings
        self.qemu = settings.qemu
        self.executable = executable
        self.bus = bus
        self._computations: dict[str, Computation] = {}
        self._by_cid: dict[int, str] = {}
        self._ports = host_port_pool(self.qemu.HOST_FWD_RANGE)
        self._cids = guest_cid_pool(self.qemu.VSOCK_GUEST_CID)
        self._displays = vnc_display_pool(self.qemu.VSOCK_VNC)
        self._closing = False
        self._release_hooks: list[Callable[[int], object]] = []
        self._background: set[asyncio.Future[None]] = set()
        self._store = StateStore(Path(settings.service.STATE_DIR))

    def on_release(self, hook: Callable[[int], object]) -> None:
        """Called with the guest CID whenever a VM's resources are released."""
        self._release_hooks.append(hook)

    def publish_agent_message(self, message: pb.ClientStreamMessage) -> None:
        """Agent events and logs, already stamped with the computation id of their CID."""
        METRICS.agent_messages.inc()
        self._console_agent_log(message)  # operator queries (stub until Machine)
        self.bus.publish(message)

    # -- queries ---------------------------------------------------------------------------

    def computation_for_cid(self, cid: int) -> str | None:
        """Which computation speaks from this vsock CID; agents cannot choose their own id."""
        return self._by_cid.get(cid)

    def computations(self) -> dict[str, Computation]:
        return dict(self._computations)

    def subscribe(self, computation_id: str = "") -> Subscription:
        return self.bus.subscribe(computation_id)

    # -- Run -------------------------------------------------------------------------------

    async def run(self, request: pb.ComputationRunReq) -> pb.RunResponse:
        try:
            with _tracer.start_as_current_span("validate"):
                validate_run_request(request)
                manifest = manifest_json(request)
                self._admit_check(request.id)
                check_images(self.qemu)
            computation = self._admit(request.id)
        except ManagerError as error:
            METRICS.run_failures.labels(reason=failure_reason(error)).inc()
            raise
        launch = asyncio.ensure_future(self._launch(computation, manifest))
        computation.launch = launch
        try:
            await asyncio.shield(launch)
        except asyncio.CancelledError:
            if launch.done() and not launch.cancelled():
                raise
            if not launch.done():  # our caller went away (client cancel, deadline, shutdown)
                launch.cancel()
                with contextlib.suppress(BaseException):
                    await launch
                raise
            if self._closing:
                raise UnavailableError(
                    f"the manager is shutting down: the VM of computation {request.id!r} "
                    "was stopped while starting"
                ) from None
            raise AbortedError(
                f"computation {request.id!r} was stopped while its VM was starting"
            ) from None
        return pb.RunResponse(
            agent_port=str(computation.resources.host_port), computation_id=request.id
        )

    def _admit_check(self, computation_id: str) -> None:
        if self._closing:
            raise UnavailableError("the manager is shutting down")
        if computation_id in self._computations:
            raise AlreadyExistsError(f"computation {computation_id!r} is already running")
        limit = self.settings.service.MAX_VMS
        if limit and len(self._computations) >= limit:
            raise ResourceExhaustedError(f"MANAGER_MAX_VMS: already running {limit} VMs")

    def _admit(self, computation_id: str) -> Computation:
        """Reserves id, port, CID and display in one synchronous step."""
        self._admit_check(computation_id)
        port = self._ports.take()
        try:
            cid = self._cids.take()
            try:
                display = self._displays.take()
            except BaseException:
                self._cids.release(cid)
                raise
        except BaseException:
            self._ports.release(port)
            raise
        vm_uuid = str(uuid.uuid4())
        computation = Computation(
            id=computation_id,
            uuid=vm_uuid,
            resources=VmResources(uuid=vm_uuid, host_port=port, guest_cid=cid, vnc_display=display),
        )
        try:
            self._store.save(self._record(computation))
        except OSError as error:
            self._ports.release(port)
            self._cids.release(cid)
            self._displays.release(display)
            raise FailedPreconditionError(
                f"MANAGER_STATE_DIR: cannot write the VM record in {str(self._store.directory)!r}: "
                f"{error.strerror}"
            ) from None
        self._computations[computation_id] = computation
        self._by_cid[cid] = computation_id
        METRICS.vms_running.set(len(self._computations))
        self._publish_event(computation_id, PROVISION, "starting")
        return computation

    async def _launch(self, computation: Computation, manifest: bytes) -> None:
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    await self._start_once(computation, manifest)
                    break
                except VmStartError as error:
                    if attempt == START_ATTEMPTS or not self._reallocate_after(computation, error):
                        raise
                    _log.warning(
                        "VM start hit a taken resource; retrying",
                        computation_id=computation.id,
                        attempt=attempt,
                        error=str(error),
                    )
            computation.state = State.RUNNING
            self._store.save(self._record(computation))
            self._publish_event(
                computation.id, PROVISION, "complete", self._vm_details(computation)
            )
            _log.info(
                "computation running",
                computation_id=computation.id,
                **self._vm_details(computation),
            )
        except BaseException as error:
            await asyncio.shield(self._discard(computation))
            METRICS.run_failures.labels(reason=failure_reason(error)).inc()
            if isinstance(error, asyncio.CancelledError):
                self._publish_event(computation.id, PROVISION, "failed", {"error": "cancelled"})
            else:
                self._publish_event(computation.id, PROVISION, "failed", {"error": str(error)})
                _log.warning(
                    "computation failed to start", computation_id=computation.id, error=str(error)
                )
            raise

    def _vm_details(self, computation: Computation) -> dict[str, Any]:
        r = computation.resources
        details: dict[str, Any] = {
            "agent_port": r.host_port,
            "guest_cid": r.guest_cid,
            "vnc_display": r.vnc_display,
        }
        if computation.process is not None:
            details["pid"] = computation.process.pid
        return details

    def _reallocate_after(self, computation: Computation, error: VmStartError) -> bool:
        """A port or display taken by another process between probe and QEMU's bind."""
        text = str(error)
        old = computation.resources
        if "host forwarding" in text:
            self._ports.release(old.host_port)
            computation.resources = VmResources(
                old.uuid, self._ports.take(avoid={old.host_port}), old.guest_cid, old.vnc_display
            )
            return True
        if "VNC" in text or "vnc" in text:
            self._displays.release(old.vnc_display)
            computation.resources = VmResources(
                old.uuid, old.host_port, old.guest_cid, self._displays.take(avoid={old.vnc_display})
            )
            return True
        return False

    async def _start_once(self, computation: Computation, manifest: bytes) -> None:
        fw_cfg = self.qemu.AGENT_CHANNEL is AgentChannel.FW_CFG
        if computation.files is None:
            with _tracer.start_as_current_span("prepare-files"):
                computation.files = await _prepare_files(
                    self.qemu, computation.uuid, manifest if fw_cfg else None
                )
        files = computation.files
        vm = derive_vm_settings(self.qemu, computation.resources)
        args = qemu_args(vm, vsock_device=not fw_cfg)
        if fw_cfg and files.manifest is not None:
            args += [
                "-fw_cfg",
                f"name={FW_CFG_MANIFEST_NAME},file={_escape_opt(str(files.manifest))}",
            ]
        with _tracer.start_as_current_span("start-qemu") as span:
            listener = qmp_listener(files.qmp_socket)
            try:
                argv = self.executable.command([*args, *qmp_args(listener)])
                process = await QemuProcess.spawn(
                    argv, qmp_listener=listener, on_line=self._line_sink(computation.id)
                )
            finally:
                listener.close()
            computation.process = process
            self._store.save(self._record(computation))
            span.set_attribute("qemu.pid", process.pid)
            self._publish_event(computation.id, PROVISION, "in-progress", {"pid": process.pid})
            try:
                await process.wait_ready(files.qmp_socket, self.qemu.START_TIMEOUT)
            except BaseException:
                await self._reap(computation)
                raise
        process.exited.add_done_callback(lambda _: self._on_exit(computation, process))
        if not fw_cfg:
            with _tracer.start_as_current_span("handover"):
                await self._handover_vsock(computation, manifest)

    async def _handover_vsock(self, computation: Computation, manifest: bytes) -> None:
        process = computation.process
        assert process is not None
        try:
            await send_manifest(
                self._agent_connector(computation.resources.guest_cid),
                manifest,
                abort=process.exited,
                timeout=self.qemu.START_TIMEOUT,
            )
        except HandoverAborted:
            await process.wait_output()
            raise VmStartError(
                f"QEMU exited before the agent took the manifest "
                f"({process.exited.result().describe()}): {process.failure_text()}"
            ) from None
        except Exception as error:
            raise VmStartError(f"manifest hand-over to the agent failed: {error}") from None

    async def _reap(self, computation: Computation) -> None:
        """Makes sure the process of a failed attempt is gone before anything is reused."""
        process = computation.process
        if process is not None:
            process.kill_now()
            await process.terminate(0)
            computation.process = None

    def _line_sink(self, computation_id: str) -> Any:
        console = self._console_of(computation_id)  # operator queries (stub until Machine)

        def sink(stream: str, text: str) -> None:
            console.append("info" if stream == "stdout" else "warn", text)  # (stub until Machine)
            _log.info(text, computation_id=computation_id, source=f"qemu-{stream}")
            self.bus.publish(
                log_message(computation_id, "info" if stream == "stdout" else "warn", text)
            )

        return sink

    # -- exits and release -----------------------------------------------------------------

    def _on_exit(self, computation: Computation, process: QemuProcess) -> None:
        if computation.state is State.RUNNING and computation.process is process:
            task = asyncio.ensure_future(self._unexpected_exit(computation, process))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _unexpected_exit(self, computation: Computation, process: QemuProcess) -> None:
        await process.wait_output(0.2)
        info = process.exited.result()
        await self._discard(computation)
        self._publish_event(
            computation.id,
            EXIT,
            "complete" if info.returncode == 0 else "failed",
            {"exit": info.describe(), "returncode": info.returncode, "last_lines": process.tail()},
        )
        _log.warning(
            "VM exited on its own",
            computation_id=computation.id,
            exit=info.describe(),
            last_lines=process.tail()[-5:],
        )

    async def _discard(self, computation: Computation) -> None:
        """The one release path: process reaped, files removed, numbers and id freed."""
        if computation.released:
            return
        computation.released = True
        if computation.process is not None and not computation.process.exited.done():
            computation.process.kill_now()
            await computation.process.terminate(0)
        if computation.files is not None:
            computation.files.remove()
        self._store.remove(computation.uuid)
        r = computation.resources
        self._ports.release(r.host_port)
        self._cids.release(r.guest_cid)
        self._displays.release(r.vnc_display)
        if self._by_cid.get(r.guest_cid) == computation.id:
            del self._by_cid[r.guest_cid]
        if self._computations.get(computation.id) is computation:
            del self._computations[computation.id]
        METRICS.vms_running.set(len(self._computations))
        for hook in self._release_hooks:
            hook(r.guest_cid)
        if not computation.stopped.done():
            computation.stopped.set_result(None)

    # -- records and restart ---------------------------------------------------------------

    def _record(self, computation: Computation) -> VmRecord:
        r = computation.resources
        if computation.files is not None:
            files = computation.files.paths
        else:  # not prepared yet: name everything that may be made
            files = vm_paths(self.qemu, computation.uuid, with_manifest=True)
        record = VmRecord(
            computation_id=computation.id,
            uuid=computation.uuid,
            state="running" if computation.state is State.RUNNING else "starting",
            host_port=r.host_port,
            guest_cid=r.guest_cid,
            vnc_display=r.vnc_display,
            files={name: str(path) for name, path in files.items()},
        )
        process = computation.process
        if process is not None:
            record.pid, record.start_time = process.pid, process.start_time
            record.argv, record.cmdline = process.argv, process.cmdline
        return record

    async def recover(self) -> None:
        """Re-adopts the VMs an earlier run of the daemon left running; cleans up the rest.

        Only a VM whose Run had answered and whose process is provably the one recorded (PID,
        start time and command line) and still answers QMP is kept. On any doubt the VM is
        killed and its files removed, as libvirt does, rather than risk a VM nobody tracks.
        """
        try:
            self._store.open()
        except OSError as error:
            raise FailedPreconditionError(
                f"MANAGER_STATE_DIR: cannot create {str(self._store.directory)!r}: {error.strerror}"
            ) from None
        records = self._store.load_all()
        # Two records may claim one computation id (never written so, but files can be
        # edited): the first one adopted wins, so adopt one id at a time.
        by_id: dict[str, list[VmRecord]] = {}
        for record in records:
            by_id.setdefault(record.computation_id, []).append(record)

        async def recover_id(group: list[VmRecord]) -> None:
            for record in group:
                await self._recover_one(record)

        await asyncio.gather(*(recover_id(group) for group in by_id.values()))

    async def _recover_one(self, record: VmRecord) -> None:
        log = _log.bind(computation_id=record.computation_id, pid=record.pid)
        process: QemuProcess | None = None
        if record.pid:
            try:
                process = QemuProcess.adopt(
                    record.pid,
                    record.argv,
                    record.start_time,
                    record.cmdline if record.state == "running" else None,
                )
            except ProcessLookupError:
                process = None
        files = VmFiles(
            directory=Path(self.qemu.TMP_FILE_LOC),
            paths={name: Path(path) for name, path in record.files.items()},
        )
        reason = ""
        if process is None:
            reason = "its QEMU is gone"
        elif record.state != "running":
            reason = "it was still starting when the daemon stopped"
        elif record.computation_id in self._computations:
            reason = "another VM holds its computation id"
        else:
            try:
                # A busy host may answer slowly; that is no doubt about the VM's identity.
                await process.check_qmp(files.qmp_socket, timeout=self.qemu.START_TIMEOUT)
            except Exception as error:
                reason = f"its QMP monitor does not answer ({error!r})"
        if reason:
            if process is not None:
                process.kill_now()
                await process.terminate(0)
            files.remove()
            self._store.remove(record.uuid)
            log.warning(f"VM record cleaned up: {reason}")
            return
        assert process is not None
        resources = VmResources(record.uuid, record.host_port, record.guest_cid, record.vnc_display)
        computation = Computation(
            id=record.computation_id,
            uuid=record.uuid,
            resources=resources,
            state=State.RUNNING,
            files=files,
            process=process,
            adopted=True,  # operator queries (stub until Machine)
            started_at=started_at_from_ticks(record.start_time),
        )
        self._ports.hold(record.host_port)
        self._cids.hold(record.guest_cid)
        self._displays.hold(record.vnc_display)
        self._computations[computation.id] = computation
        self._by_cid[record.guest_cid] = computation.id
        METRICS.vms_running.set(len(self._computations))
        process.exited.add_done_callback(lambda _: self._on_exit(computation, process))
        log.info("VM re-adopted after restart", agent_port=record.host_port)
        details = {**self._vm_details(computation), "readopted": True}
        self._publish_event(computation.id, PROVISION, "complete", details)

    # -- Stop ------------------------------------------------------------------------------

    async def stop(self, computation_id: str) -> None:
        computation = self._computations.get(computation_id)
        if computation is None:
            raise NotFoundError(f"computation {computation_id!r} is not running")
        with _tracer.start_as_current_span("stop"):
            await self._stop(computation)

    async def _stop(self, computation: Computation) -> ExitInfo | None:
        if computation.state is State.STOPPING:
            await asyncio.shield(computation.stopped)
            return None
        if computation.state is State.STARTING:
            computation.state = State.STOPPING
            self._publish_event(computation.id, STOP, "starting")
            if computation.launch is not None:
                computation.launch.cancel()
                with contextlib.suppress(BaseException):
                    await computation.launch
            await self._discard(computation)
            self._publish_event(computation.id, STOP, "complete")
            return None
        computation.state = State.STOPPING
        self._publish_event(computation.id, STOP, "starting")
        info = None
        try:
            if computation.process is not None:
                info = await asyncio.shield(computation.process.terminate(self.qemu.STOP_TIMEOUT))
        finally:
            await asyncio.shield(self._discard(computation))
        details = {"exit": info.describe()} if info else None
        self._publish_event(computation.id, STOP, "complete", details)
        _log.info(
            "computation stopped",
            computation_id=computation.id,
            exit=info.describe() if info else None,
        )
        return info

    # -- shutdown --------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """New Runs are refused from now on, and Runs still waiting for their VM end now (their
        VMs are discarded): no client could use a VM that becomes ready while the daemon stops,
        and the in-flight grace would otherwise be spent waiting for it."""
        self._closing = True
        for computation in self._computations.values():
            if computation.state is State.STARTING and computation.launch is not None:
                computation.launch.cancel()

    async def shutdown(self, stop_vms: bool = True) -> None:
        self._closing = True
        if stop_vms:
            await asyncio.gather(
                *(self._stop(c) for c in list(self._computations.values())),
                return_exceptions=True,
            )

    # -- events ----------------------------------------------------------------------------

    def _publish_event(
        self,
        computation_id: str,
        event_type: str,
        status: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.bus.publish(manager_event(computation_id, event_type, status, details))

    # -- operator queries (stub until Machine) ---------------------------------------------
    # List, Logs and per-VM metrics on today's computation table (issue 13). The Machine
    # rewrite replaces this block and the lines marked "stub until Machine" above; the
    # interface it keeps is in docs/contracts.md, "Operator queries".

    @functools.cached_property
    def consoles(self) -> ConsoleArchive:
        """Live and recently ended VMs' consoles; a VM's console ends when it is released."""
        archive = ConsoleArchive.from_settings(self.settings.service)
        self.on_release(lambda _cid: self._close_released_consoles())
        return archive

    def _close_released_consoles(self) -> None:
        for log in self.consoles.live_logs():
            if log.computation_id not in self._computations:
                self.consoles.close(log)

    def _console_of(self, computation_id: str) -> ConsoleLog:
        """The live console of a computation: opened at its first start attempt, kept across
        retries."""
        log = self.consoles.live(computation_id)
        return log if log is not None else self.consoles.open(computation_id)

    def _console_agent_log(self, message: pb.ClientStreamMessage) -> None:
        if message.WhichOneof("message") != "agent_log":
            return
        log = message.agent_log
        if log.computation_id in self._computations:
            stamp = log.timestamp.ToNanoseconds() if log.HasField("timestamp") else None
            self._console_of(log.computation_id).append(log.level, log.message, stamp)

    def console(self, computation_id: str) -> ConsoleLog:
        """The console Logs reads: the live computation's, else a retained ended one."""
        log = self.consoles.get(computation_id)
        if log is None and computation_id in self._computations:
            log = self._console_of(computation_id)  # adopted: QEMU's output is not reattached
        if log is None:
            raise NotFoundError(
                f"computation {computation_id!r} is not running and no console of it is kept"
            )
        return log

    def list_computations(self) -> list[pb.ComputationInfo]:
        return [
            computation_info(
                c.id,
                state=c.state.value,
                host_port=c.resources.host_port,
                guest_cid=c.resources.guest_cid,
                vnc_display=c.resources.vnc_display,
                pid=c.process.pid if c.process is not None else None,
                started_at=c.started_at,
                expires_at=c.expires_at,
                adopted=c.adopted,
            )
            for c in sorted(self._computations.values(), key=lambda c: c.id)
        ]

    def vm_pids(self) -> list[tuple[str, int]]:
        """For the per-VM metrics collector, called from the scrape thread: one snapshot."""
        return [
            (c.id, c.process.pid)
            for c in tuple(self._computations.values())
            if c.process is not None
        ]
