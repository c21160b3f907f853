"""The vocabulary of a VM's lifecycle: its states and the transitions between them, why a VM
ends, the events each change publishes, and what every Machine of a service shares.

vm/machine.py is where these are used: `Machine._set_state` is the one place a state changes
(docs/architecture.md, "VM states and the events they publish").
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cocos_manager.agent import Connect
from cocos_manager.config import Settings
from cocos_manager.errors import QemuStopFailedError
from cocos_manager.events import ConsoleArchive, EventBus
from cocos_manager.host import StateStore, TaskSet
from cocos_manager.qemu import ConsoleFiles, Executable, LineCallback, QemuProcess, VmResources
from cocos_manager.vm.resources import Pools

PROVISION = "vm-provision"
STOP = "vm-stop"
EXIT = "vm-exit"
PAUSED = "vm-paused"
RESUMED = "vm-resumed"
# QEMU run states in which the guest cannot go on by itself (QMP query-status after STOP).
HALT_STATES = frozenset({"internal-error", "guest-panicked", "io-error", "shutdown"})
START_ATTEMPTS = 3


class VmState(enum.Enum):
    ADMITTED = "admitted"  # id, numbers and record held; files being prepared
    STARTING = "starting"  # a QEMU of this VM runs; not yet handed to the client
    RUNNING = "running"  # the Run answered (or the VM was re-adopted)
    PAUSED = "paused"  # QEMU halted the guest; kept for inspection (ON_GUEST_HALT=keep)
    STOPPING = "stopping"  # Stop, shutdown or TTL is taking it down
    RELEASED = "released"  # nothing of it is left: process, files, numbers, record


_ALLOWED: dict[VmState | None, frozenset[VmState]] = {
    # Admitted, or re-adopted (running, or kept paused for inspection).
    None: frozenset({VmState.ADMITTED, VmState.RUNNING, VmState.PAUSED}),
    VmState.ADMITTED: frozenset({VmState.STARTING, VmState.STOPPING, VmState.RELEASED}),
    # STARTING -> STARTING: the next attempt, after a number was taken from under QEMU.
    VmState.STARTING: frozenset(
        {VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.RELEASED}
    ),
    VmState.RUNNING: frozenset({VmState.PAUSED, VmState.STOPPING, VmState.RELEASED}),
    VmState.PAUSED: frozenset({VmState.RUNNING, VmState.STOPPING, VmState.RELEASED}),
    VmState.STOPPING: frozenset({VmState.RELEASED}),
    VmState.RELEASED: frozenset(),
}


class StopReason(enum.Enum):
    CLIENT = "client"  # the Run's caller went away (cancel, deadline)
    STOP = "stop"  # a Stop request
    SHUTDOWN = "shutdown"  # the daemon is stopping
    EXIT = "exit"  # QEMU exited on its own
    TTL = "ttl"  # the computation's time to live ran out
    FAILED = "failed"  # the start failed
    HALTED = "halted"  # QEMU reported the guest halted (internal error, panic, I/O error)


@dataclass(frozen=True)
class VmEnd:
    """How a VM ended, as its final event said it (for Get, after the VM is gone)."""

    reason: StopReason
    event: tuple[str, str]
    details: dict[str, Any]
    at: float


class StateError(Exception):
    """A transition the lifecycle does not have: a bug, never a client's fault."""


def check_transition(computation_id: str, old: VmState | None, new: VmState) -> None:
    """Raises StateError unless the lifecycle has the transition from `old` to `new`."""
    if new not in _ALLOWED[old]:
        previous = old.value if old else "nothing"
        raise StateError(
            f"computation {computation_id!r}: no transition from {previous} to {new.value}"
        )


class Released(Protocol):
    """What the service is told of a VM that is gone (the Machine, seen from here)."""

    id: str

    @property
    def resources(self) -> VmResources: ...


class Launcher(Protocol):
    """Starts one QEMU: `QemuProcess.start`, or a stand-in in the Machine's unit tests."""

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        qmp_listener: socket.socket,
        on_line: LineCallback,
        env: dict[str, str] | None,
        console: ConsoleFiles | None = None,
        on_keeper_lost: Callable[[str], None] | None = None,
        on_unstoppable: Callable[[QemuStopFailedError], None] | None = None,
    ) -> QemuProcess: ...


@dataclass
class MachineContext:
    """What all Machines of one service share."""

    settings: Settings
    executable: Executable
    bus: EventBus
    store: StateStore
    pools: Pools
    tasks: TaskSet
    agent_connector: Callable[[int], Connect]
    on_released: Callable[[Released], None]
    consoles: ConsoleArchive = field(default_factory=ConsoleArchive)
    launch: Launcher = QemuProcess.start
    # Called with the guest CID once its QEMU is gone, before the final event; what it
    # returns, if anything, is awaited: the VM's agent connections end (and publish what they
    # were acked for) before that event, not after it (docs/decisions.md, pacing).
    end_agents: Callable[[int], Awaitable[object] | None] = lambda _cid: None
