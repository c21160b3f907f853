"""One VM: its lease, files, process, record and logger, and the one place its state changes.

    ADMITTED ──> STARTING ──> RUNNING ⇄ PAUSED ──> STOPPING ──> RELEASED
        │           │  ↺ retry   │          │                    ↑
        └───────────┴────────────┴──────────┴────────────────────┘  (failed start, exit)

`_set_state` is the only writer of `state`: it checks the transition, logs it, saves the
record (or removes it on RELEASED) and publishes the event. Teardown has one path,
`_release`, which runs once in a task of its own whatever ended the VM (a failed or cancelled
start, Stop, shutdown, TTL, QEMU's own exit), so a cancelled caller never leaves half a VM.
The states, their events and the teardown: docs/architecture.md.

So that this file reads as the transitions, the steps that change no state live apart: a start
attempt's files, command line and hand-over in vm/start.py, how QEMU is ended and the end told
in vm/stop.py, QEMU's word that the guest halted in vm/guest_watch.py, its output lines in
vm/output.py, the record's shape in vm/record.py, re-adoption in vm/recovery.py. Each calls back
here for the state change.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from opentelemetry import trace

from cocos_manager.agent import AgentSettings
from cocos_manager.config import AgentChannel
from cocos_manager.errors import (
    FailedPreconditionError,
    QemuExitedError,
    QemuStopFailedError,
    ResourceExhaustedError,
)
from cocos_manager.events import manager_event
from cocos_manager.qemu import (
    Conflict,
    QemuProcess,
    VmResources,
    VmSize,
    qmp_listener,
)
from cocos_manager.telemetry import get_logger
from cocos_manager.vm import record as vm_record
from cocos_manager.vm import start as vm_start
from cocos_manager.vm import stop as vm_stop
from cocos_manager.vm import ttl
from cocos_manager.vm.files import VmFiles
from cocos_manager.vm.guest_watch import GuestWatch
from cocos_manager.vm.lifecycle import (
    PAUSED,
    PROVISION,
    RESUMED,
    START_ATTEMPTS,
    STOP,
    MachineContext,
    StopReason,
    VmEnd,
    VmState,
    check_transition,
)
from cocos_manager.vm.output import VmOutput
from cocos_manager.vm.resources import Lease

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
        # A CreateVm'd VM: what its agent is handed through the 9p shares (no manifest).
        self.agent_settings: AgentSettings | None = None
        self.expires_at: float | None = None
        self.ttl_timer: ttl.Alarm | None = None
        self.start_task: asyncio.Task[None] | None = None
        self.released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releasing: asyncio.Task[None] | None = None
        self._failing = False
        self.stop_failure: QemuStopFailedError | None = None  # QEMU outlived the release
        self.spawning_argv: list[str] = []  # the command line of the QEMU being spawned
        self.halt: dict[str, Any] | None = None  # QEMU's words when it halted the guest
        # What it was launched with, for AttestationPolicy (launch.py; kept in its record)
        self.launch: dict[str, Any] | None = None
        self.operator_paused = False  # paused by a Pause request (vm/pause.py)
        self.pausing = False  # a Pause's QMP stop is in flight
        self.forced = asyncio.Event()  # a forced Stop: no power-down grace, or no more of it
        self.size = VmSize()  # vCPUs and memory the Run asked for (vm/size.py)
        self.launch_settings: dict[str, str] = {}  # MANAGER_QEMU_* as this VM got them
        self.ended: VmEnd | None = None  # how it ended, once released (for Get)
        self.log = _log.bind(computation_id=computation_id)
        self.output = VmOutput(
            computation_id, self.console, ctx.bus, ctx.settings.service, self.log
        )
        self._guest = GuestWatch(self)

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
        return vm_start.details(self)

    # -- the one place the state changes -----------------------------------------------------

    def _set_state(self, new: VmState, event: tuple[str, str], details: dict[str, Any]) -> None:
        old = self.state
        check_transition(self.id, old, new)
        self.state = new
        try:
            if new is not VmState.RELEASED:  # released: the record goes after the event
                self.ctx.store.save(vm_record.record_of(self))
        except OSError as error:
            if vm_record.required(old, new):  # the admission, or this start, fails instead
                self.state = old
                raise vm_record.record_error(self.ctx.store.directory, error) from None
            self.log.error("cannot write the VM record", error=error.strerror)
        self.history.append(new)
        self.log.info(f"VM {new.value}", previous=old.value if old else None, **details)
        event_type, status = event
        self.ctx.bus.publish(manager_event(self.id, event_type, status, details or None))

    def _save_record(self) -> None:
        """A new version of the record with no change of state: the command line of the QEMU
        about to be spawned. Without it a restart could not find that QEMU: the attempt fails."""
        try:
            self.ctx.store.save(vm_record.record_of(self))
        except OSError as error:
            raise vm_record.record_error(self.ctx.store.directory, error) from None

    # -- admission ---------------------------------------------------------------------------

    @classmethod
    def admit(cls, ctx: MachineContext, computation_id: str, vm_uuid: str) -> Machine:
        """Numbers and a record, synchronously; nothing is left behind if either fails."""
        lease = ctx.pools.lease(computation_id, vm_uuid)
        machine = cls(ctx, computation_id, lease)
        try:
            machine._set_state(VmState.ADMITTED, (PROVISION, "starting"), {})
        except (ResourceExhaustedError, FailedPreconditionError) as error:
            lease.release()
            ctx.consoles.discard(machine.console)
            vm_start.tell_admission_failed(machine, error)
            raise
        return machine

    # -- start -------------------------------------------------------------------------------

    async def start(self, manifest: bytes) -> None:
        """From ADMITTED to RUNNING; on any failure or cancellation the VM is released and the
        error re-raised untouched (CancelledError included)."""
        try:
            await vm_start.prepare_files(self, manifest)
            await vm_start.note_launch(self)
            taken = vm_start.TakenNumbers()
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    await self._attempt(manifest)
                    break
                except QemuExitedError as error:
                    if error.conflict is None or self.stop_reason:
                        raise
                    taken.swap(self, Conflict(error.conflict), attempt, error)  # or raises
                    self._failing = False
            self._not_stopping()
            self.expires_at = ttl.expires_at(self.ttl)
            self._set_state(VmState.RUNNING, (PROVISION, "complete"), self.details())
            vm_start.arm_ttl(self)
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

    def _not_stopping(self) -> None:
        """A Stop that came while this start was between two awaits wins over the start."""
        if self.state is VmState.STOPPING:
            raise asyncio.CancelledError

    async def _attempt(self, manifest: bytes) -> None:
        """One QEMU: spawned, owned before any await, and reaped if this attempt fails."""
        assert self.files is not None
        qmp_path = self.files.qmp_socket
        timeout = self.ctx.settings.qemu.START_TIMEOUT
        with _tracer.start_as_current_span("start-qemu") as span:
            listener = qmp_listener(qmp_path)
            try:
                argv = vm_start.vm_command(self, listener, manifest)
                # The command line is recorded before the spawn: a daemon killed while QEMU is
                # being started leaves a record by which the next start finds that QEMU.
                self.spawning_argv = argv
                self._save_record()
                process = await vm_start.launch(self, argv, listener)
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
                self._guest.watch(process)
            except BaseException:
                self._failing = True
                await vm_start.reap_attempt(self, process)
                raise
        try:
            if vm_start.needs_handover(self):
                with _tracer.start_as_current_span("handover"):
                    await vm_start.handover(self, process, manifest)
            if process.exited.done():  # between the agent's answer and now: not a running VM
                raise await process.exited_at_start("right after start-up")
        except BaseException:
            self._failing = True
            await vm_start.reap_attempt(self, process)
            raise

    # -- exit --------------------------------------------------------------------------------

    def _on_exit(self, process: QemuProcess) -> None:
        """QEMU ended. While starting, the start path sees it; once running, it is released."""
        if self.process is process and self.state in (VmState.RUNNING, VmState.PAUSED):
            self.stop_reason = StopReason.EXIT
            self._release(StopReason.EXIT)

    # -- QEMU's own events (decided in vm/guest_watch.py; the transitions are here) --------------

    def paused(self, details: dict[str, Any]) -> None:
        """QEMU halted the guest and MANAGER_QEMU_ON_GUEST_HALT=keep: kept for inspection."""
        self._set_state(VmState.PAUSED, (PAUSED, "failed"), {**self.details(), **details})

    def resumed(self) -> None:
        self.halt = None  # running again: a later Stop powers it down as any other
        self.operator_paused = False
        self._set_state(VmState.RUNNING, (RESUMED, "complete"), self.details())

    def paused_by_operator(self, details: dict[str, Any]) -> None:
        """A Pause request froze the guest (vm/pause.py): the same state as a kept halt, told
        apart by `operator_paused` (and status complete: nothing went wrong)."""
        self.operator_paused = True
        self._set_state(VmState.PAUSED, (PAUSED, "complete"), {**self.details(), **details})

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, reason: StopReason, *, force: bool = False) -> None:
        """Returns once everything of the VM is released, whatever state it was in. `force`:
        no power-down grace; a release already waiting on it stops waiting."""
        if force:
            self.forced.set()
        if self.state in (VmState.ADMITTED, VmState.STARTING) and self._failing:
            # The start is already failing on its own: its error stands; no retry after this.
            self.stop_reason = self.stop_reason or reason
        elif self.state in (VmState.ADMITTED, VmState.STARTING):
            self.stop_reason = reason
            self._set_state(
                VmState.STOPPING, (STOP, "starting"), vm_stop.stop_details(self, reason)
            )
            if self.start_task is not None and not self.start_task.done():
                self.start_task.cancel()
                # A start cancelled before its first step never runs its own clean-up.
                self.start_task.add_done_callback(lambda _: self._release(reason))
            else:
                self._release(reason)
        elif self.state in (VmState.RUNNING, VmState.PAUSED):
            self.stop_reason = reason
            self._set_state(
                VmState.STOPPING, (STOP, "starting"), vm_stop.stop_details(self, reason)
            )
            self._release(reason)
        await asyncio.shield(self.released)
        if self.stop_failure is not None and reason is StopReason.STOP:
            raise self.stop_failure

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
        self.ctx.bus.unpace(self.id)  # what its agent has sent goes out before the final event
        details = vm_stop.release_details(self, reason)
        process = self.process
        try:
            if process is not None:
                details.update(await vm_stop.end_or_tell(self, process, reason, ran=self._ran))
        finally:
            vm_stop.let_go(self, process)
            final = vm_stop.final_event(self, reason)
            self.ended = VmEnd(reason, final, details, time.time())
            self._set_state(VmState.RELEASED, final, details)
            # An unlink on ext4 can wait milliseconds for the journal: after the final event;
            # so can the end of a keeper whose last record is read (vm_stop.keeper_then).
            gone = vm_stop.keeper_then(process, self.ctx.store.remove_soon(self.uuid))
            self.ctx.on_released(self)
            gone.add_done_callback(lambda _: vm_stop.settle(self.released))
        await asyncio.shield(gone)

    @property
    def _ran(self) -> bool:
        """Whether the VM reached RUNNING (a stop of a starting VM kills it at once)."""
        return self.start_task is None or (self.start_task.done() and not self._failing)

    # -- adoption ----------------------------------------------------------------------------

    def readopted(self, *, paused: bool, by_operator: bool = False, halted: str = "") -> None:
        """Supervision and state of a VM recovery.adopt_machine proved to be the recorded one."""
        process = self.process
        assert process is not None
        process.exited.add_done_callback(lambda _: self._on_exit(process))
        self._guest.watch(process)
        vm_start.follow_console(self, process)
        details = {**self.details(), "readopted": True}
        if paused and by_operator:
            self.operator_paused = True
            self._set_state(VmState.PAUSED, (PAUSED, "complete"), {**details, "reason": "pause"})
        elif paused:
            self.halt = {"qemu_status": halted or "paused before the restart"}
            self._set_state(VmState.PAUSED, (PAUSED, "failed"), details)
        else:
            self._set_state(VmState.RUNNING, (PROVISION, "complete"), details)
        if process.exited.done():  # died between the identity check and now
            self._on_exit(process)
        else:
            vm_start.arm_ttl(self)
