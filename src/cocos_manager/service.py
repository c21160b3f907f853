"""The computations of this host: admission, the registry, and the entry points of the API.

Admission (closing, duplicate id, MAX_VMS, numbers, record) is one synchronous step on the
event loop, so two Runs can never both pass a check that only one may. Everything about one
VM after that, its whole lifecycle, is its `Machine` (vm/machine.py); restarts are vm/recovery.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from opentelemetry import trace

from cocos_manager.agent import (
    Connect,
    LateAgentMessages,
    agent_settings,
    create_ttl,
    effective_ttl,
    validated_manifest,
    vsock_connector,
)
from cocos_manager.config import Settings
from cocos_manager.errors import (
    AlreadyExistsError,
    ManagerError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    mark_told,
)
from cocos_manager.events import ConsoleArchive, ConsoleLog, EventBus, Subscription
from cocos_manager.host import StateStore, TaskSet
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu import Executable, QemuProcess
from cocos_manager.telemetry import METRICS, get_logger
from cocos_manager.vm import (
    PROVISION,
    EndedVms,
    Machine,
    MachineContext,
    Pool,
    Pools,
    Released,
    StopReason,
    VmState,
    announce_shutdown,
    append_agent_log,
    check_images,
    cvm_info,
    end_streams,
    hold_tmp_dir,
    machine_info,
    pause_vm,
    recover,
    requested_size,
    resume_vm,
    share_tmp_dir,
    start_to_running,
    stop_or_leave,
    stop_starting,
    vm_info,
)

_tracer = trace.get_tracer("cocos_manager.service")
_log = get_logger()


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
        self.settings = settings
        self.qemu = settings.qemu
        self.executable = executable
        self.bus = bus
        self.pools = Pools.from_settings(self.qemu)
        self.tasks = TaskSet()
        self._machines: dict[str, Machine] = {}
        self._closing = False
        self._leaving = False  # shutdown detaches the VMs (MANAGER_SHUTDOWN_STOPS_VMS=false)
        self._release_hooks: list[Callable[[int], object]] = []
        self._store = StateStore(Path(settings.service.STATE_DIR))
        self._tmp_lock: int | None = None  # flock on TMP_FILE_LOC (vm/orphans.py)
        self.ctx = MachineContext(
            settings=settings,
            executable=executable,
            bus=bus,
            store=self._store,
            pools=self.pools,
            tasks=self.tasks,
            agent_connector=agent_connector,
            on_released=self._released,
            consoles=ConsoleArchive.from_settings(settings.service),
        )
        self._ended = EndedVms(self.ctx.consoles)  # Get of VMs that ended, while retained
        self._late_agent_messages = LateAgentMessages()

    def on_release(self, hook: Callable[[int], object]) -> None:
        """Called with the guest CID whenever a VM's resources are released."""
        self._release_hooks.append(hook)

    def publish_agent_message(self, message: pb.ClientStreamMessage) -> None:
        """Stamped agent messages; none once their VM is released: its final event is its last."""
        METRICS.agent_messages.inc()
        is_log = message.WhichOneof("message") == "agent_log"
        stamped = message.agent_log if is_log else message.agent_event
        if (machine := self._machines.get(stamped.computation_id)) is None:
            return self._late_agent_messages.note(stamped.computation_id)
        if is_log:
            append_agent_log(machine.console, message.agent_log)
        self.bus.publish(message, computation_id=stamped.computation_id)

    # -- queries ---------------------------------------------------------------------------

    def computation_for_cid(self, cid: int) -> str | None:
        """Which computation speaks from this vsock CID; agents cannot choose their own id."""
        return self.pools.cid_owner.get(cid)

    def computations(self) -> dict[str, Machine]:
        return dict(self._machines)

    def subscribe(self, computation_id: str = "") -> Subscription:
        return self.bus.subscribe(computation_id)

    # The pools, for tests and benchmarks that check what is held.
    @property
    def _ports(self) -> Pool:
        return self.pools.ports

    @property
    def _cids(self) -> Pool:
        return self.pools.cids

    @property
    def _displays(self) -> Pool:
        return self.pools.displays

    @property
    def _by_cid(self) -> dict[int, str]:
        return self.pools.cid_owner

    # -- Run -------------------------------------------------------------------------------

    async def run(self, request: pb.ComputationRunReq) -> pb.RunResponse:
        try:
            with _tracer.start_as_current_span("validate"):
                manifest = await validated_manifest(request)
                size = requested_size(request, self.qemu)
                self._admit_check(request.id)
                check_images(self.qemu)
            machine = self._admit(request.id)
            machine.ttl = effective_ttl(request, self.settings)
            machine.size = size
        except ManagerError as error:
            METRICS.run_failures.labels(reason=error.reason).inc()
            raise
        await self._start(machine, manifest)
        return pb.RunResponse(
            agent_port=str(machine.resources.host_port), computation_id=request.id
        )

    async def _start(self, machine: Machine, payload: bytes) -> None:
        """An admitted VM to RUNNING; a caller that goes away (cancel, deadline) leaves
        nothing behind. `payload`: the manifest, or a CreateVm'd VM's environment file."""
        try:
            await start_to_running(machine, payload)
        except BaseException as error:  # a cancelled caller's CancelledError included
            # A cancellation that cut the start's wait for its release (one is under way
            # once a stop reason is set): its final event decides.
            if machine.ended is None and machine.stop_reason is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(machine.released)
            ended = machine.ended
            mark_told(error, ended is not None and ended.event == (PROVISION, "failed"))
            raise

    # -- today's upstream control plane: CreateVm, RemoveVm, CVMInfo -------------------------

    async def create_vm(self, request: pb.CreateReq) -> pb.CreateRes:
        """A VM whose agent gets its settings through 9p shares instead of a manifest; from
        then on a computation like any other (its id is the new cvm_id)."""
        cvm_id = str(uuid.uuid4())
        try:
            with _tracer.start_as_current_span("validate"):
                ttl = create_ttl(request, self.settings)
                agent = agent_settings(request, cvm_id, self.qemu.KERNEL_CMDLINE)
                self._admit_check(cvm_id)
                check_images(self.qemu)
            machine = self._admit(cvm_id)
            machine.ttl = ttl
            machine.agent_settings = agent
        except ManagerError as error:
            METRICS.run_failures.labels(reason=error.reason).inc()
            raise
        await self._start(machine, agent.environment)
        return pb.CreateRes(forwarded_port=str(machine.resources.host_port), cvm_id=cvm_id)

    def cvm_info(self, vm_id: str) -> pb.CVMInfoRes:
        """Of that VM, as its QEMU was launched (a VM of Run too: one id space)."""
        return cvm_info(vm_id, self._spawned(vm_id).argv, self.settings)

    def _admit_check(self, computation_id: str) -> None:
        if self._closing:
            raise UnavailableError("the manager is shutting down")
        if computation_id in self._machines:
            raise AlreadyExistsError(f"computation {computation_id!r} is already running")
        limit = self.settings.service.MAX_VMS
        if limit and len(self._machines) >= limit:
            raise ResourceExhaustedError(f"MANAGER_MAX_VMS: already running {limit} VMs")

    def _admit(self, computation_id: str) -> Machine:
        """Id, numbers and record in one synchronous step."""
        self._admit_check(computation_id)
        machine = Machine.admit(self.ctx, computation_id, str(uuid.uuid4()))
        self._machines[computation_id] = machine
        METRICS.vms_running.set(len(self._machines))
        return machine

    def _released(self, machine: Released) -> None:
        if self._machines.get(machine.id) is machine:
            del self._machines[machine.id]
            self._ended.keep(machine)
            self.bus.pace_again(machine.id)
        METRICS.vms_running.set(len(self._machines))
        for hook in self._release_hooks:
            hook(machine.resources.guest_cid)

    # -- restart ---------------------------------------------------------------------------

    async def recover(self) -> None:
        tmp = Path(self.qemu.TMP_FILE_LOC)
        self._tmp_lock, alone = await asyncio.to_thread(hold_tmp_dir, tmp)
        if not alone:
            _log.warning(
                "MANAGER_QEMU_TMP_FILE_LOC is held by another process (another cocos-manager?): "
                "QEMUs and per-VM files there that no VM record names are not looked for",
                tmp_file_loc=str(tmp),
            )
        await recover(
            self.ctx, self._machines, self._ended, sweep=alone and self._tmp_lock is not None
        )
        if alone and self._tmp_lock is not None:
            share_tmp_dir(self._tmp_lock)
        METRICS.vms_running.set(len(self._machines))

    # -- Stop ------------------------------------------------------------------------------

    async def stop(self, computation_id: str, *, force: bool = False) -> None:
        machine = self._held(computation_id)
        if self._leaving:
            # Its QMP session and pidfd are being let go of: this daemon could no longer
            # tell when QEMU ends.
            raise UnavailableError(
                "the manager is shutting down and leaves its VMs running for the next start "
                f"(MANAGER_SHUTDOWN_STOPS_VMS=false): stop {computation_id!r} once it is back"
            )
        await machine.stop(StopReason.STOP, force=force)

    # -- Pause, Resume, Get (vm/pause.py, vm/inspect.py) --------------------------------

    def _held(self, computation_id: str) -> Machine:
        machine = self._machines.get(computation_id)
        if machine is None:
            raise NotFoundError(f"computation {computation_id!r} is not running")
        return machine

    def _spawned(self, computation_id: str) -> QemuProcess:
        process = self._held(computation_id).process
        if process is None:
            raise NotFoundError(f"computation {computation_id!r} is not running")
        return process

    async def pause(self, computation_id: str) -> None:
        await pause_vm(self._held(computation_id))

    async def resume(self, computation_id: str) -> None:
        await resume_vm(self._held(computation_id))

    def get(self, computation_id: str) -> pb.GetResponse:
        """A held VM, else one that ended while its console is still kept."""
        machine = self._machines.get(computation_id)
        return vm_info(machine) if machine is not None else self._ended.get(computation_id)

    # -- shutdown --------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """New Runs refused from now on; the shutdown announced, VMs still starting stopped."""
        if not self._closing:
            announce_shutdown(self.ctx, sorted(self._machines))
        self._closing = True
        stop_starting(self.ctx, self._machines.values())

    async def shutdown(self, stop_vms: bool = True) -> None:
        self._closing = True
        if not stop_vms:
            self._leaving = True
        await stop_or_leave(list(self._machines.values()), stop_vms)
        await self.tasks.join(timeout=self.qemu.STOP_TIMEOUT + 5)
        await asyncio.to_thread(self._store.close)  # the records left for the next start
        if self._tmp_lock is not None:
            os.close(self._tmp_lock)
            self._tmp_lock = None

    def end_streams(self) -> None:
        """After `shutdown`: the last word of every Events stream and Logs follower
        (vm/shutdown.py). Streams opened later end at once (after a replay or tail). The
        daemon's exit then waits on no stream's VM."""
        end_streams(self.ctx, sorted(self._machines))

    # -- attestation policy (confidential launch: vm/attestation.py) ---------------------------

    async def attestation_policy(self, computation_id: str) -> bytes:
        """The JSON document a verifier checks this computation's attestation report with."""
        from cocos_manager.vm import computation_policy_json

        process = self._spawned(computation_id)
        launch = self._machines[computation_id].launch
        return await asyncio.to_thread(
            computation_policy_json, launch, process.argv, computation_id
        )

    # -- operator queries: List, Logs, per-VM metrics --------------------------------------

    def list_computations(self) -> list[pb.ComputationInfo]:
        return [
            machine_info(m)
            for m in sorted(self._machines.values(), key=lambda m: m.id)
            if m.state not in (None, VmState.RELEASED)
        ]

    def console(self, computation_id: str) -> ConsoleLog:
        log = self.ctx.consoles.get(computation_id)
        if log is None:
            raise NotFoundError(
                f"computation {computation_id!r} is not running and no console of it is kept"
            )
        return log

    def vm_pids(self) -> list[tuple[str, int]]:
        return [
            (m.id, m.process.pid) for m in tuple(self._machines.values()) if m.process is not None
        ]
