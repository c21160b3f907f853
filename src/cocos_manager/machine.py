"""One VM: its lease, files, process, record and logger, and the one place its state changes.

    ADMITTED ──> STARTING ──> RUNNING ⇄ PAUSED ──> STOPPING ──> RELEASED
        │           │  ↺ retry   │          │                    ↑
        └───────────┴────────────┴──────────┴────────────────────┘  (failed start, exit)

`_set_state` is the only writer of `state`: it checks the transition, logs it, saves the
record (or removes it on RELEASED) and publishes the event. Teardown has one path,
`_release`, which runs once in a task of its own whatever ended the VM (a failed or cancelled
start, Stop, shutdown, TTL, QEMU's own exit), so a cancelled caller never leaves half a VM.
The states, their events and the teardown: docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from typing import Any

from opentelemetry import trace

from cocos_manager import ttl, workers
from cocos_manager.confidential import launched_binding
from cocos_manager.console_limit import ConsoleLogLimiter
from cocos_manager.errors import (
    FailedPreconditionError,
    HandoverFailedError,
    HandoverTimeoutError,
    QemuExitedError,
    QemuStopFailedError,
    ResourceExhaustedError,
)
from cocos_manager.events import log_message, manager_event
from cocos_manager.lifecycle import (
    _ALLOWED,
    EXIT,
    HALT_STATES,
    PAUSED,
    PROVISION,
    RESUMED,
    START_ATTEMPTS,
    STOP,
    MachineContext,
    StateError,
    StopReason,
    VmState,
)
from cocos_manager.listing import started_at_from_ticks
from cocos_manager.logging import get_logger
from cocos_manager.qemu_argv import (
    VmResources,
    vm_args,
)
from cocos_manager.qemu_env import qemu_environment
from cocos_manager.qemu_failures import Conflict, conflicts_exhausted
from cocos_manager.qemu_process import (
    ExitInfo,
    QemuProcess,
    qmp_args,
    qmp_listener,
)
from cocos_manager.qmp import QmpClosed, QmpError
from cocos_manager.resources import Lease
from cocos_manager.settings import AgentChannel, GuestHaltAction
from cocos_manager.state_store import VmRecord
from cocos_manager.vm_files import VmFiles, WouldCopy, prepare_vm_files, vm_paths
from cocos_manager.vsock import HandoverAborted, HandoverTimeout, send_manifest

_tracer = trace.get_tracer("cocos_manager.machine")
_log = get_logger()


class Machine:
    def __init__(
        self,
        ctx: MachineContext,
        computation_id: str,
        lease: Lease,
        *,
        files: VmFiles | None = None,
        process: QemuProcess | None = None,
        adopted: bool = False,
    ) -> None:
        self.ctx = ctx
        self.id = computation_id
        self.lease = lease
        self.files = files
        self.process = process
        self.adopted = adopted
        self.state: VmState | None = None
        self.history: list[VmState] = []  # every state it went through, for List and tests
        self.stop_reason: StopReason | None = None
        self.error: BaseException | None = None
        self.started_at = time.time()
        self.console = ctx.consoles.open(computation_id)
        self.ttl: float | None = None
        self.expires_at: float | None = None
        self.ttl_timer: asyncio.TimerHandle | None = None
        self.start_task: asyncio.Task[None] | None = None
        self.released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releasing: asyncio.Task[None] | None = None
        self._failing = False
        self.stop_failure: QemuStopFailedError | None = None  # QEMU outlived the release
        self.halt: dict[str, Any] | None = None  # QEMU's words when it halted the guest
        self._console_limit = ConsoleLogLimiter.from_settings(ctx.settings.service)
        self.log = _log.bind(computation_id=computation_id)

    # -- identity --------------------------------------------------------------------------

    @property
    def uuid(self) -> str:
        return self.lease.resources.uuid

    @property
    def resources(self) -> VmResources:
        return self.lease.resources

    @property
    def fw_cfg(self) -> bool:
        return self.ctx.settings.qemu.AGENT_CHANNEL is AgentChannel.FW_CFG

    def details(self) -> dict[str, Any]:
        r = self.resources
        details: dict[str, Any] = {"agent_port": r.host_port, "vnc_display": r.vnc_display}
        if not self.fw_cfg:
            details["guest_cid"] = r.guest_cid
        if self.process is not None:
            details["pid"] = self.process.pid
            details.update(launched_binding(self.process.argv))  # host_data / mrconfigid
        return details

    def record(self) -> VmRecord:
        r = self.resources
        q = self.ctx.settings.qemu
        files = (
            self.files.paths
            if self.files is not None
            else vm_paths(q, self.uuid, with_manifest=True)
        )
        record = VmRecord(
            computation_id=self.id,
            uuid=self.uuid,
            state=self.state.value if self.state else VmState.ADMITTED.value,
            host_port=r.host_port,
            guest_cid=r.guest_cid,
            vnc_display=r.vnc_display,
            files={name: str(path) for name, path in files.items()},
            expires_at=self.expires_at,
        )
        if self.process is not None:
            record.pid, record.start_time = self.process.pid, self.process.start_time
            record.argv, record.cmdline = self.process.argv, self.process.cmdline
        return record

    # -- the one place the state changes -----------------------------------------------------

    def _set_state(self, new: VmState, event: tuple[str, str], details: dict[str, Any]) -> None:
        old = self.state
        if new not in _ALLOWED[old]:
            previous = old.value if old else "nothing"
            raise StateError(
                f"computation {self.id!r}: no transition from {previous} to {new.value}"
            )
        self.state = new
        self.history.append(new)
        self.log.info(f"VM {new.value}", previous=old.value if old else None, **details)
        try:
            if new is VmState.RELEASED:
                self.ctx.store.remove(self.uuid)
            else:
                self.ctx.store.save(self.record())
        except OSError as error:
            if old is None or new is VmState.STARTING:
                # Without the record that names its QEMU, a restart could not find this VM:
                # the admission, or this attempt (its QEMU reaped), fails instead.
                raise self._record_error(error) from None
            self.log.error("cannot write the VM record", error=error.strerror)
        event_type, status = event
        self.ctx.bus.publish(manager_event(self.id, event_type, status, details or None))

    # -- admission ---------------------------------------------------------------------------

    @classmethod
    def admit(cls, ctx: MachineContext, computation_id: str, vm_uuid: str) -> Machine:
        """Numbers and a record, synchronously; nothing is left behind if either fails."""
        lease = ctx.pools.lease(computation_id, vm_uuid)
        machine = cls(ctx, computation_id, lease)
        try:
            machine._set_state(VmState.ADMITTED, (PROVISION, "starting"), {})
        except (ResourceExhaustedError, FailedPreconditionError):
            lease.release()
            ctx.consoles.discard(machine.console)
            raise
        return machine

    def _record_error(self, error: OSError) -> ResourceExhaustedError | FailedPreconditionError:
        directory = str(self.ctx.store.directory)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceExhaustedError(
                f"MANAGER_STATE_DIR: no space left for the VM record in {directory!r}"
            )
        return FailedPreconditionError(
            f"MANAGER_STATE_DIR: cannot write the VM record in {directory!r}: {error.strerror}"
        )

    # -- start -------------------------------------------------------------------------------

    async def start(self, manifest: bytes) -> None:
        """From ADMITTED to RUNNING; on any failure or cancellation the VM is released and the
        error re-raised untouched (CancelledError included)."""
        try:
            await self._prepare_files(manifest)
            taken: list[tuple[Conflict, int]] = []
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    await self._attempt(manifest)
                    break
                except QemuExitedError as error:
                    if error.conflict is None or self.stop_reason:
                        raise
                    # -- records: each attempt's taken number, named when all attempts fail.
                    taken.append((Conflict(error.conflict), self._number(Conflict(error.conflict))))
                    if attempt == START_ATTEMPTS:
                        if error.conflict == Conflict.GUEST_CID.value:  # as swap() would
                            self.ctx.pools.cids.shun(self.resources.guest_cid)
                        raise conflicts_exhausted(taken, START_ATTEMPTS) from error
                    self._failing = False
                    self.log.warning(
                        "VM start hit a taken resource; retrying",
                        attempt=attempt,
                        conflict=error.conflict,
                        error=str(error),
                    )
                    self.lease.swap(Conflict(error.conflict))
            self._not_stopping()
            self.expires_at = ttl.expires_at(self.ttl)
            self._set_state(VmState.RUNNING, (PROVISION, "complete"), self.details())
            self.arm_ttl()
        except BaseException as error:
            self._failing = True
            cancelled = isinstance(error, asyncio.CancelledError)
            if not cancelled:
                self.error = error
                self.log.warning("computation failed to start", error=str(error))
            if self.stop_reason is None:
                self.stop_reason = StopReason.CLIENT if cancelled else StopReason.FAILED
            await asyncio.shield(self._release(self.stop_reason))
            raise

    def _number(self, conflict: Conflict) -> int:
        r = self.resources
        if conflict is Conflict.HOST_PORT:
            return r.host_port
        return r.vnc_display if conflict is Conflict.VNC_DISPLAY else r.guest_cid

    def arm_ttl(self) -> None:
        if self.expires_at is not None:
            self.ttl_timer = ttl.arm(self.expires_at, self._ttl_expired)

    def _ttl_expired(self) -> None:
        self.ctx.tasks.spawn(self.stop(StopReason.TTL), name=f"ttl:{self.id}")

    def _not_stopping(self) -> None:
        """A Stop that came while this start was between two awaits wins over the start."""
        if self.state is VmState.STOPPING:
            raise asyncio.CancelledError

    async def _prepare_files(self, manifest: bytes) -> None:
        """On the loop when kernel and rootfs can be hard-linked (the usual case: a few system
        calls, and no thread hop, which in a burst of 32 Runs was the costlier part); else in
        a worker thread, which a cancelled Run cannot interrupt: on cancellation the files it
        still makes are removed once it ends."""
        q = self.ctx.settings.qemu
        vm_manifest = manifest if self.fw_cfg else None
        with _tracer.start_as_current_span("prepare-files"):
            try:
                self.files = prepare_vm_files(q, self.uuid, vm_manifest, copy_shared=False)
                return
            except WouldCopy:
                pass
            preparing = asyncio.get_running_loop().run_in_executor(
                workers.pool, prepare_vm_files, q, self.uuid, vm_manifest
            )
            try:
                self.files = await asyncio.shield(preparing)
            except asyncio.CancelledError:
                with contextlib.suppress(BaseException):
                    self.files = await preparing
                raise

    def _argv(self, listener: socket.socket, payload: bytes) -> list[str]:
        """`payload`: the manifest, bound into attestation with MANAGER_QEMU_BIND_MANIFEST."""
        assert self.files is not None
        args = vm_args(
            self.ctx.settings.qemu,
            self.resources,
            manifest_file=self.files.manifest,
            manifest=payload,
        )
        return self.ctx.executable.vm_command(
            [*args, *qmp_args(listener)], keep_fds=(listener.fileno(),)
        )

    async def _attempt(self, manifest: bytes) -> None:
        """One QEMU: spawned, owned before any await, and reaped if this attempt fails."""
        assert self.files is not None
        qmp_path = self.files.qmp_socket
        timeout = self.ctx.settings.qemu.START_TIMEOUT
        with _tracer.start_as_current_span("start-qemu") as span:
            listener = qmp_listener(qmp_path)
            try:
                process = await self.ctx.launch(
                    self._argv(listener, manifest),
                    qmp_listener=listener,
                    on_line=self._on_line,
                    env=qemu_environment(self.ctx.settings.qemu),
                )
            finally:
                listener.close()
            self.process = process
            span.set_attribute("qemu.pid", process.pid)
            try:
                self._not_stopping()
                self._set_state(VmState.STARTING, (PROVISION, "in-progress"), {"pid": process.pid})
                process.exited.add_done_callback(lambda _: self._on_exit(process))
                await process.attach_output()
                await process.wait_ready(qmp_path, timeout)
                self._watch(process)
            except BaseException:
                self._failing = True
                await self._reap(process)
                raise
        try:
            if not self.fw_cfg:
                with _tracer.start_as_current_span("handover"):
                    await self._handover(process, manifest)
            if process.exited.done():  # between the agent's answer and now: not a running VM
                raise await process.exited_at_start("right after start-up")
        except BaseException:
            self._failing = True
            await self._reap(process)
            raise

    async def _handover(self, process: QemuProcess, manifest: bytes) -> None:
        timeout = self.ctx.settings.qemu.START_TIMEOUT
        try:
            await send_manifest(
                self.ctx.agent_connector(self.resources.guest_cid),
                manifest,
                abort=process.exited,
                timeout=timeout,
            )
        except HandoverAborted:
            raise await process.exited_at_start("before the agent took the manifest") from None
        except HandoverTimeout as error:
            raise HandoverTimeoutError(str(error)) from None
        except Exception as error:
            raise HandoverFailedError(f"manifest hand-over to the agent failed: {error}") from None

    async def _reap(self, process: QemuProcess) -> None:
        """The per-attempt guard: this attempt's QEMU is gone before anything is reused. Shielded,
        so a second cancellation cannot leave it running; the release reaps it again if so."""
        process.close_pipes()
        process.kill_now()
        try:
            await asyncio.shield(process.terminate(0))
        except QemuStopFailedError as error:  # the start's own error is the one to answer
            self.stop_failure = error
            self.log.error("QEMU could not be stopped", error=str(error))
        if self.process is process:
            self.process = None

    def _on_line(self, stream: str, text: str) -> None:
        """Every line reaches Events; the daemon's own log takes them at a bounded rate, so a
        chatty guest cannot trip journald's limit and hide the daemon's errors."""
        level = "info" if stream == "stdout" else "warn"
        self.console.append(level, text)
        if self._console_limit.allow():
            if note := self._console_limit.suppressed_note():
                self.log.warning(note)
            if level == "info":
                self.log.info(text, source="qemu-stdout")
            else:
                self.log.warning(text, source="qemu-stderr")
        self.ctx.bus.publish(log_message(self.id, level, text))

    # -- exit --------------------------------------------------------------------------------

    def _on_exit(self, process: QemuProcess) -> None:
        """QEMU ended. While starting, the start path sees it; once running, it is released."""
        if self.process is process and self.state in (VmState.RUNNING, VmState.PAUSED):
            self.stop_reason = StopReason.EXIT
            self._release(StopReason.EXIT)

    # -- QEMU's own events -------------------------------------------------------------------

    def _watch(self, process: QemuProcess) -> None:
        if process.monitor is not None:
            process.monitor.on_event = lambda event: self._on_qmp_event(process, event)

    def _on_qmp_event(self, process: QemuProcess, event: dict[str, Any]) -> None:
        """As libvirt does: a guest QEMU stopped is not a running VM."""
        name, data = event.get("event"), event.get("data") or {}
        if self.process is not process:
            return
        self.log.info("QEMU event", qmp_event=name, data=data)
        if name == "GUEST_PANICKED":
            self._halted({"qemu_status": "guest-panicked", "qemu_event": name, "info": data})
        elif name == "STOP":
            self.ctx.tasks.spawn(self._check_halt(process), name=f"qmp-status:{self.id}")
        elif name == "RESUME" and self.state is VmState.PAUSED:
            self.halt = None  # running again: a later Stop powers it down as any other
            self._set_state(VmState.RUNNING, (RESUMED, "complete"), self.details())

    async def _check_halt(self, process: QemuProcess) -> None:
        if process.monitor is None:
            return
        with contextlib.suppress(Exception):  # QEMU gone meanwhile: its exit tells the rest
            status = await process.monitor.query_status()
            if status in HALT_STATES and self.process is process:
                self._halted({"qemu_status": status, "qemu_event": "STOP"})

    def _halted(self, details: dict[str, Any]) -> None:
        if self.state is not VmState.RUNNING:
            return  # starting: the start path fails on its own; stopping: already going
        self.halt = details
        self.log.warning("QEMU halted the guest", **details)
        if self.ctx.settings.qemu.ON_GUEST_HALT is GuestHaltAction.KEEP:
            self._set_state(VmState.PAUSED, (PAUSED, "failed"), {**self.details(), **details})
        else:
            self.ctx.tasks.spawn(self.stop(StopReason.HALTED), name=f"halted:{self.id}")

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, reason: StopReason) -> None:
        """Returns once everything of the VM is released, whatever state it was in."""
        if self.state in (VmState.ADMITTED, VmState.STARTING) and self._failing:
            # The start is already failing on its own: its error stands; no retry after this.
            self.stop_reason = self.stop_reason or reason
        elif self.state in (VmState.ADMITTED, VmState.STARTING):
            self.stop_reason = reason
            self._set_state(VmState.STOPPING, (STOP, "starting"), self._stop_details(reason))
            if self.start_task is not None and not self.start_task.done():
                self.start_task.cancel()
                # A start cancelled before its first step never runs its own clean-up.
                self.start_task.add_done_callback(lambda _: self._release(reason))
            else:
                self._release(reason)
        elif self.state in (VmState.RUNNING, VmState.PAUSED):
            self.stop_reason = reason
            self._set_state(VmState.STOPPING, (STOP, "starting"), self._stop_details(reason))
            self._release(reason)
        await asyncio.shield(self.released)
        if self.stop_failure is not None and reason is StopReason.STOP:
            raise self.stop_failure

    def _stop_details(self, reason: StopReason) -> dict[str, Any]:
        if reason is StopReason.TTL and self.expires_at is not None:
            return ttl.stop_details(self.expires_at)  # the deadline that ran out
        return {"reason": reason.value}

    # -- release: the one teardown path -------------------------------------------------------

    def _release(self, reason: StopReason) -> asyncio.Task[None]:
        """Starts the teardown once; callers await it shielded, so their cancellation never
        interrupts it."""
        if self._releasing is None:
            self._releasing = self.ctx.tasks.spawn(
                self._teardown(reason), name=f"release:{self.id}"
            )
        return self._releasing

    async def _teardown(self, reason: StopReason) -> None:
        details: dict[str, Any] = {"reason": reason.value}
        if self.error is not None:
            details["error"] = str(self.error)
        elif reason is StopReason.CLIENT:
            details["error"] = "cancelled"
        process = self.process
        try:
            if process is not None:
                details.update(await self._end_process(process, reason))
        except QemuStopFailedError as error:
            # Never STOPPING for ever: the VM is released and the Stop told (FAILED_PRECONDITION).
            self.stop_failure = error
            details["error"] = str(error)
            self.log.error("QEMU could not be stopped", error=str(error))
        finally:
            if note := self._console_limit.suppressed_note():
                self.log.warning(note)
            if self.files is not None:
                self.files.remove()
            self.lease.release()
            if self.ttl_timer is not None:
                self.ttl_timer.cancel()
            self.ctx.consoles.close(self.console)
            self._set_state(VmState.RELEASED, self._final_event(reason), details)
            self.ctx.on_released(self)
            if not self.released.done():
                self.released.set_result(None)

    async def _end_process(self, process: QemuProcess, reason: StopReason) -> dict[str, Any]:
        if reason is StopReason.EXIT:
            await process.wait_output(0.2)
            info = process.exited.result()
            if await process.quit_orphan():  # sudo killed under a live QEMU
                self.log.warning(
                    "sudo ended with its QEMU's QMP session open (sudo killed?): QEMU told to quit"
                )
            tail = process.tail()
            self.log.warning("VM exited on its own", exit=info.describe(), last_lines=tail[-5:])
            return {"exit": info.describe(), "returncode": info.returncode, "last_lines": tail}
        if self._ran:
            with _tracer.start_as_current_span("stop"):
                info = await self._terminate(process)
            return {"exit": info.describe(), **(self.halt or {})}
        process.close_pipes()
        process.kill_now()
        await process.terminate(0)
        return {}

    @property
    def _ran(self) -> bool:
        """Whether the VM reached RUNNING (a stop of a starting VM kills it at once)."""
        return self.start_task is None or (self.start_task.done() and not self._failing)

    async def _terminate(self, process: QemuProcess) -> ExitInfo:
        """ACPI power-down first when a grace is set (the guest shuts down cleanly), then
        SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        q = self.ctx.settings.qemu
        if q.POWERDOWN_GRACE > 0 and process.monitor is not None and self.halt is None:
            try:
                await asyncio.wait_for(process.monitor.execute("system_powerdown"), 2.0)
                await asyncio.wait_for(asyncio.shield(process.exited), q.POWERDOWN_GRACE)
            except (TimeoutError, QmpClosed, QmpError) as error:
                if not process.exited.done():
                    self.log.info("guest did not power down in time", error=repr(error))
            else:
                self.log.info("guest powered down", grace=q.POWERDOWN_GRACE)
        return await process.terminate(q.STOP_TIMEOUT)

    def _final_event(self, reason: StopReason) -> tuple[str, str]:
        if reason is StopReason.HALTED:
            return (EXIT, "failed")
        if reason is StopReason.EXIT:
            exited = self.process is not None and self.process.exited.done()
            ok = (
                exited and self.process is not None and self.process.exited.result().returncode == 0
            )
            return (EXIT, "complete" if ok else "failed")
        if self.error is not None or reason in (StopReason.FAILED, StopReason.CLIENT):
            return (PROVISION, "failed")
        return (STOP, "failed" if self.stop_failure is not None else "complete")

    # -- adoption ----------------------------------------------------------------------------

    @classmethod
    def adopt(
        cls, ctx: MachineContext, record: VmRecord, process: QemuProcess, files: VmFiles
    ) -> Machine:
        """A VM an earlier run of the daemon started, proven to be the recorded one."""
        resources = VmResources(record.uuid, record.host_port, record.guest_cid, record.vnc_display)
        lease = ctx.pools.hold(record.computation_id, resources)
        machine = cls(ctx, record.computation_id, lease, files=files, process=process, adopted=True)
        machine.started_at = started_at_from_ticks(record.start_time) or machine.started_at
        machine.expires_at = record.expires_at
        process.exited.add_done_callback(lambda _: machine._on_exit(process))
        machine._watch(process)
        details = {**machine.details(), "readopted": True}
        if record.state == VmState.PAUSED.value:
            machine.halt = {"qemu_status": "paused before the restart"}
            machine._set_state(VmState.PAUSED, (PAUSED, "failed"), details)
        else:
            machine._set_state(VmState.RUNNING, (PROVISION, "complete"), details)
        if process.exited.done():  # died between the identity check and now
            machine._on_exit(process)
        else:
            machine.arm_ttl()
        return machine
