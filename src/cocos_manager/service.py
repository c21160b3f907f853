"""The computations of this host: admission, the registry, and the entry points of the API.

Admission (closing, duplicate id, MAX_VMS, numbers, record) is one synchronous step on the
event loop, so two Runs can never both pass a check that only one may. Everything about one
VM after that, its whole lifecycle, is its `Machine` (machine.py); restarts are recovery.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

from opentelemetry import trace

from cocos_manager.agent.manifest import effective_ttl, validated_manifest
from cocos_manager.agent.vsock import Connect, vsock_connector
from cocos_manager.config.settings import Settings
from cocos_manager.errors import (
    AbortedError,
    AlreadyExistsError,
    ManagerError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from cocos_manager.events.bus import EventBus, Subscription
from cocos_manager.events.console import ConsoleArchive, ConsoleLog
from cocos_manager.host.state_store import StateStore
from cocos_manager.host.tasks import TaskSet
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu.argv import Executable
from cocos_manager.telemetry.logging import get_logger
from cocos_manager.telemetry.metrics import METRICS
from cocos_manager.vm import pause as vm_pause
from cocos_manager.vm.files import check_images
from cocos_manager.vm.inspect import vm_info
from cocos_manager.vm.lifecycle import MachineContext, StopReason, VmState
from cocos_manager.vm.listing import computation_info
from cocos_manager.vm.machine import Machine
from cocos_manager.vm.recovery import recover
from cocos_manager.vm.resources import Pool, Pools
from cocos_manager.vm.size import requested_size

_tracer = trace.get_tracer("cocos_manager.service")
_log = get_logger()


def failure_reason(error: BaseException) -> str:
    """The label of manager_run_failures_total: each error type names its own."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, ManagerError):
        return error.reason
    return "internal"


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
        self._ended: dict[str, pb.GetResponse] = {}  # Get of VMs that ended, while retained
        self._closing = False
        self._release_hooks: list[Callable[[int], object]] = []
        self._store = StateStore(Path(settings.service.STATE_DIR))
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

    def on_release(self, hook: Callable[[int], object]) -> None:
        """Called with the guest CID whenever a VM's resources are released."""
        self._release_hooks.append(hook)

    def publish_agent_message(self, message: pb.ClientStreamMessage) -> None:
        """Agent events and logs, already stamped with the computation id of their CID."""
        METRICS.agent_messages.inc()
        if message.WhichOneof("message") == "agent_log":
            log = message.agent_log
            machine = self._machines.get(log.computation_id)
            if machine is not None:
                stamp = None
                if log.HasField("timestamp"):
                    with contextlib.suppress(ValueError):  # outside years 1-9999: ours then
                        stamp = log.timestamp.ToNanoseconds()
                machine.console.append(log.level, log.message, stamp)
        self.bus.publish(message)

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
        start = asyncio.get_running_loop().create_task(
            machine.start(manifest), name=f"start:{request.id}"
        )
        machine.start_task = start
        try:
            await asyncio.shield(start)
        except asyncio.CancelledError:
            METRICS.run_failures.labels(reason="cancelled").inc()
            if not start.done():  # our caller went away (client cancel, deadline)
                start.cancel()
                with contextlib.suppress(BaseException):
                    await start
                raise
            if not start.cancelled():
                if start.exception() is None:
                    # Ready in the instant its caller went away: nobody will ever hear of it.
                    await asyncio.shield(machine.stop(StopReason.CLIENT))
                raise
            if machine.stop_reason is StopReason.SHUTDOWN:
                raise UnavailableError(
                    f"the manager is shutting down: the VM of computation {request.id!r} "
                    "was stopped while starting"
                ) from None
            raise AbortedError(
                f"computation {request.id!r} was stopped while its VM was starting"
            ) from None
        except Exception as error:
            METRICS.run_failures.labels(reason=failure_reason(error)).inc()
            raise
        return pb.RunResponse(
            agent_port=str(machine.resources.host_port), computation_id=request.id
        )

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

    def _released(self, machine: Machine) -> None:
        if self._machines.get(machine.id) is machine:
            del self._machines[machine.id]
            self._keep_ended(machine)
        METRICS.vms_running.set(len(self._machines))
        for hook in self._release_hooks:
            hook(machine.resources.guest_cid)

    # -- restart ---------------------------------------------------------------------------

    async def recover(self) -> None:
        await recover(self.ctx, self._machines)
        METRICS.vms_running.set(len(self._machines))

    # -- Stop ------------------------------------------------------------------------------

    async def stop(self, computation_id: str, *, force: bool = False) -> None:
        machine = self._machines.get(computation_id)
        if machine is None:
            raise NotFoundError(f"computation {computation_id!r} is not running")
        await machine.stop(StopReason.STOP, force=force)

    # -- Pause, Resume, Get (vm/pause.py, vm/inspect.py) --------------------------------

    def _held(self, computation_id: str) -> Machine:
        machine = self._machines.get(computation_id)
        if machine is None:
            raise NotFoundError(f"computation {computation_id!r} is not running")
        return machine

    async def pause(self, computation_id: str) -> None:
        await vm_pause.pause(self._held(computation_id))

    async def resume(self, computation_id: str) -> None:
        await vm_pause.resume(self._held(computation_id))

    def get(self, computation_id: str) -> pb.GetResponse:
        """A held VM, else one that ended while its console is still kept (the same
        retention, MANAGER_LOG_RETENTION and MANAGER_LOG_RETAINED_VMS)."""
        machine = self._machines.get(computation_id)
        if machine is not None:
            return vm_info(machine)
        self._prune_ended()
        ended = self._ended.get(computation_id)
        if ended is None:
            raise NotFoundError(
                f"computation {computation_id!r} is not running and no record of its end is kept"
            )
        return ended

    def _keep_ended(self, machine: Machine) -> None:
        """Get's answer for a VM that ended; never in the way of the release it runs in."""
        try:
            info = vm_info(machine)
        except Exception as error:
            machine.log.error("cannot keep the ended VM for Get", error=repr(error))
            return
        info.ClearField("files")  # removed with the VM
        self._ended[machine.id] = info
        self._prune_ended()

    def _prune_ended(self) -> None:
        kept = set(self.ctx.consoles.retained)
        for computation_id in [i for i in self._ended if i not in kept]:
            del self._ended[computation_id]

    # -- shutdown --------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """New Runs are refused from now on, and VMs still starting are stopped now: no client
        could use a VM that becomes ready while the daemon stops, and the in-flight grace
        would otherwise be spent waiting for it."""
        self._closing = True
        for machine in list(self._machines.values()):
            if machine.state in (VmState.ADMITTED, VmState.STARTING):
                self.tasks.spawn(machine.stop(StopReason.SHUTDOWN), name=f"stop:{machine.id}")

    async def shutdown(self, stop_vms: bool = True) -> None:
        self._closing = True
        machines = list(self._machines.values())
        if stop_vms:
            await asyncio.gather(
                *(m.stop(StopReason.SHUTDOWN) for m in machines), return_exceptions=True
            )
        else:
            for machine in machines:
                if machine.state in (VmState.RUNNING, VmState.PAUSED):
                    machine.log.info(
                        "VM left running for the next start (MANAGER_SHUTDOWN_STOPS_VMS=false)",
                        state=machine.state.value,
                        **machine.details(),
                    )
                    if machine.process is not None:
                        await machine.process.detach()
        await self.tasks.join(timeout=self.qemu.STOP_TIMEOUT + 5)

    # -- attestation policy (confidential launch: attestation.py) ---------------------------

    async def attestation_policy(self, computation_id: str) -> bytes:
        """The JSON document a verifier checks this computation's attestation report with."""
        from cocos_manager.vm.attestation import computation_policy_json

        machine = self._machines.get(computation_id)
        if machine is None or machine.process is None:
            raise NotFoundError(f"computation {computation_id!r} is not running")
        return await asyncio.to_thread(
            computation_policy_json,
            self.qemu,
            machine.resources,
            machine.process.argv,
            computation_id,
            machine.size,
        )

    # -- operator queries: List, Logs, per-VM metrics --------------------------------------

    def list_computations(self) -> list[pb.ComputationInfo]:
        infos = []
        for m in sorted(self._machines.values(), key=lambda m: m.id):
            if m.state is None or m.state is VmState.RELEASED:
                continue
            state = "starting" if m.state in (VmState.ADMITTED, VmState.STARTING) else m.state.value
            infos.append(
                computation_info(
                    m.id,
                    state=state,
                    host_port=m.resources.host_port,
                    guest_cid=m.resources.guest_cid,
                    vnc_display=m.resources.vnc_display,
                    pid=m.process.pid if m.process is not None else None,
                    started_at=m.started_at,
                    expires_at=m.expires_at,
                    adopted=m.adopted,
                )
            )
        return infos

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
