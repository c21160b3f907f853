"""The Machine's lifecycle with a stand-in process (tests/support/machine_fakes.py): every
await of a start is a gate, so each test walks a VM to an exact point, acts there (cancel,
Stop, exit) and checks the exact state sequence and that nothing is left. Milliseconds each."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cocos_manager.agent.vsock import Connect
from cocos_manager.config.settings import load_settings
from cocos_manager.errors import QemuExitedError
from cocos_manager.events.bus import EventBus
from cocos_manager.host.state_store import StateStore
from cocos_manager.host.tasks import TaskSet
from cocos_manager.qemu.argv import Executable
from cocos_manager.vm import files as vm_files
from cocos_manager.vm import start as vm_start
from cocos_manager.vm.lifecycle import MachineContext, StopReason, VmState
from cocos_manager.vm.machine import Machine
from cocos_manager.vm.resources import Pools
from tests.support.harness import base_env
from tests.support.machine_fakes import FakeLauncher, Gate
from tests.support.waiting import GUARD

A, S, R, X, D = (
    VmState.ADMITTED,
    VmState.STARTING,
    VmState.RUNNING,
    VmState.STOPPING,
    VmState.RELEASED,
)


@dataclass
class Rig:
    ctx: MachineContext
    launcher: FakeLauncher
    released: list[Machine]
    tmp: Path

    def admit(self, computation_id: str = "c1") -> Machine:
        return Machine.admit(self.ctx, computation_id, f"uuid-{computation_id}")

    def start(self, machine: Machine) -> asyncio.Task[None]:
        machine.start_task = asyncio.get_running_loop().create_task(machine.start(b"{}"))
        return machine.start_task

    def left_behind(self) -> dict[str, object]:
        pools = self.ctx.pools
        return {
            "files": sorted(p.name for p in (self.tmp / "vms").glob("*")),
            "records": sorted(p.name for p in (self.tmp / "state").glob("*.json")),
            "numbers": (pools.ports.held, pools.cids.held, pools.displays.held),
            "cid map": dict(pools.cid_owner),
        }


NOTHING = {"files": [], "records": [], "numbers": (frozenset(),) * 3, "cid map": {}}


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    async with make_rig(tmp_path, monkeypatch) as made:
        yield made


@contextlib.asynccontextmanager
async def make_rig(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    agent_connector: Callable[[int], Connect] | None = None,
    **env: str,
) -> AsyncIterator[Rig]:
    for name, value in {**base_env(tmp_path), **env}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    launcher = FakeLauncher()
    released: list[Machine] = []
    store = StateStore(tmp_path / "state")
    store.open()
    ctx = MachineContext(
        settings=settings,
        executable=Executable("qemu", ()),
        bus=EventBus(),
        store=store,
        pools=Pools.from_settings(settings.qemu),
        tasks=TaskSet(),
        agent_connector=agent_connector or (lambda cid: None),  # type: ignore[arg-type,return-value]
        on_released=released.append,
        launch=launcher,
    )
    yield Rig(ctx, launcher, released, tmp_path)
    await ctx.tasks.join(5)


async def test_a_start_goes_admitted_starting_running(rig: Rig) -> None:
    machine = rig.admit()
    await rig.start(machine)
    assert machine.history == [A, S, R]
    assert [r.name for r in (rig.tmp / "state").glob("*.json")], "record kept while running"


@pytest.mark.parametrize("point", ["attach_output", "wait_ready"])
async def test_a_start_cancelled_at_each_await_reaps_its_qemu_and_leaves_nothing(
    rig: Rig, point: str
) -> None:
    gate = rig.launcher.close(point)
    machine = rig.admit()
    task = rig.start(machine)
    await gate.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(asyncio.shield(machine.released), 1)
    assert machine.history == [A, S, D]
    assert machine.stop_reason is StopReason.CLIENT
    assert "SIGKILL" in rig.launcher.processes[0].signals
    assert rig.left_behind() == NOTHING
    assert rig.released == [machine]


def links_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel and rootfs cannot be hard-linked (another filesystem): they are copied, and
    that happens in a worker thread."""

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(vm_files.os, "link", no_link)


async def test_a_start_cancelled_while_preparing_files_leaves_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    links_fail(monkeypatch)
    machine = rig.admit()
    task = rig.start(machine)
    await asyncio.sleep(0)  # inside prepare-files (a worker thread)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(asyncio.shield(machine.released), 1)
    assert machine.history == [A, D]
    assert rig.launcher.processes == []
    assert rig.left_behind() == NOTHING


async def test_a_stop_during_the_copy_of_a_cancelled_start_leaves_no_file(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Run's caller goes away while the images are copied (a worker thread nothing can
    interrupt), and a Stop comes while the start waits for that copy: the Stop's cancellation
    ended the wait, the release found no files named, and the copy made them after it."""
    links_fail(monkeypatch)
    copying, proceed, copied = threading.Event(), threading.Event(), threading.Event()
    real_copy = vm_files._sendfile_all

    def gated_copy(source: int, target: int) -> None:
        copying.set()
        try:
            proceed.wait(GUARD)
            real_copy(source, target)
        finally:
            copied.set()

    monkeypatch.setattr(vm_files, "_sendfile_all", gated_copy)
    machine = rig.admit()
    task = rig.start(machine)
    assert await asyncio.to_thread(copying.wait, GUARD)
    task.cancel()  # the Run's caller went away
    await asyncio.sleep(0.01)  # the start waits for the copy
    stop = asyncio.ensure_future(machine.stop(StopReason.STOP))
    await asyncio.sleep(0.01)
    proceed.set()
    await asyncio.wait_for(stop, GUARD)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(copied.wait, GUARD)
    await asyncio.sleep(0.05)  # whatever the thread still does after its copy
    assert rig.launcher.processes == []
    assert rig.left_behind() == NOTHING


async def test_files_are_linked_on_the_loop_and_copied_in_a_thread(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Links take a few system calls: no thread hop for them (in a burst of 32 Runs the hops
    were the cost). A copy can take seconds: never on the loop."""
    loop_thread = threading.get_ident()
    where: list[bool] = []
    original = vm_files.prepare_vm_files

    def recording(*args: Any, **kwargs: Any) -> vm_files.VmFiles:
        where.append(threading.get_ident() == loop_thread)
        return original(*args, **kwargs)

    monkeypatch.setattr(vm_start, "prepare_vm_files", recording)
    linked = rig.admit("linked")
    await rig.start(linked)
    assert linked.files is not None and linked.files.methods["kernel"] == "hardlink"
    assert where == [True]
    links_fail(monkeypatch)
    copied = rig.admit("copied")
    await rig.start(copied)
    assert copied.files is not None and copied.files.methods["kernel"] in ("reflink", "copy")
    assert where == [True, True, False]  # tried on the loop, then copied in a thread
    await asyncio.gather(linked.stop(StopReason.STOP), copied.stop(StopReason.STOP))
    assert rig.left_behind() == NOTHING


async def test_stop_while_a_failing_start_tears_down_waits_for_the_release_and_keeps_the_error(
    rig: Rig,
) -> None:
    """Stop must not answer while the failed attempt's QEMU is still being reaped, and the
    Run keeps its own error rather than becoming 'aborted'."""
    rig.launcher.gates["wait_ready"].error = QemuExitedError(
        "QEMU exited during start-up: boom", exit="exit status 1", stderr=["boom"], conflict=None
    )
    reaping = rig.launcher.close("terminate")
    machine = rig.admit()
    task = rig.start(machine)
    await reaping.entered.wait()
    stop = asyncio.ensure_future(machine.stop(StopReason.STOP))
    await asyncio.sleep(0.01)
    assert not stop.done(), "Stop answered while the failed start still held everything"
    assert rig.left_behind() != NOTHING
    reaping.opened.set()
    await asyncio.wait_for(stop, GUARD)
    assert rig.left_behind() == NOTHING
    with pytest.raises(QemuExitedError, match="boom"):
        await task
    assert machine.history == [A, S, D]


async def test_stop_while_starting_cancels_the_start_and_waits_for_the_release(rig: Rig) -> None:
    gate = rig.launcher.close("wait_ready")
    machine = rig.admit()
    task = rig.start(machine)
    await gate.entered.wait()
    await asyncio.wait_for(machine.stop(StopReason.STOP), 1)
    assert task.cancelled()
    assert machine.history == [A, S, X, D]
    assert rig.left_behind() == NOTHING


async def test_a_qemu_that_exits_before_running_fails_the_start_not_a_ghost(rig: Rig) -> None:
    """QEMU gone between the last await of the start (readiness, hand-over) and RUNNING."""
    gate = rig.launcher.close("wait_ready")
    machine = rig.admit()
    task = rig.start(machine)
    await gate.entered.wait()
    rig.launcher.processes[0].exit(0)  # its exit is seen by the start path, not as vm-exit
    gate.opened.set()
    with pytest.raises(QemuExitedError, match="right after start-up"):
        await task
    assert machine.history == [A, S, D]
    assert rig.left_behind() == NOTHING


async def test_a_running_vm_whose_qemu_exits_is_released_with_reason_exit(rig: Rig) -> None:
    machine = rig.admit()
    await rig.start(machine)
    rig.launcher.processes[0].exit(0)
    await asyncio.wait_for(asyncio.shield(machine.released), 1)
    assert machine.history == [A, S, R, D]
    assert machine.stop_reason is StopReason.EXIT
    assert rig.left_behind() == NOTHING


async def test_stop_of_a_running_vm_terminates_with_the_stop_timeout(rig: Rig) -> None:
    machine = rig.admit()
    await rig.start(machine)
    await machine.stop(StopReason.TTL)
    assert machine.history == [A, S, R, X, D]
    assert rig.launcher.processes[0].signals == [
        f"terminate({rig.ctx.settings.qemu.STOP_TIMEOUT:g})"
    ]
    assert rig.left_behind() == NOTHING


async def test_a_second_stop_waits_for_the_same_release(rig: Rig) -> None:
    gate = rig.launcher.close("terminate")
    machine = rig.admit()
    await rig.start(machine)
    first = asyncio.ensure_future(machine.stop(StopReason.STOP))
    await gate.entered.wait()
    second = asyncio.ensure_future(machine.stop(StopReason.STOP))
    await asyncio.sleep(0.01)
    assert not first.done() and not second.done()
    gate.opened.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert machine.history == [A, S, R, X, D]


async def test_a_cancelled_stop_caller_does_not_interrupt_the_release(rig: Rig) -> None:
    gate = rig.launcher.close("terminate")
    machine = rig.admit()
    await rig.start(machine)
    stop = asyncio.ensure_future(machine.stop(StopReason.STOP))
    await gate.entered.wait()
    stop.cancel()
    gate.opened.set()
    await asyncio.wait_for(asyncio.shield(machine.released), 1)
    assert rig.left_behind() == NOTHING


# -- the vsock hand-over and the retry after a taken number -------------------------------------


class GatedAgent:
    """The agent behind the guest's vsock port: each connection attempt waits at `gate`, then
    gets one end of a socketpair whose other end keeps what the manager wrote."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.cids: list[int] = []
        self.received = bytearray()
        self._keep: list[socket.socket] = []

    def connector(self, cid: int) -> Connect:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            self.cids.append(cid)
            await self.gate.pass_()
            ours, theirs = socket.socketpair()
            self._keep.append(theirs)
            return await asyncio.open_connection(sock=ours)

        return connect

    def drain(self) -> bytes:
        for sock in self._keep:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while chunk := sock.recv(65536):
                    self.received += chunk
            sock.close()
        self._keep.clear()
        return bytes(self.received)


@pytest.fixture
async def vsock_rig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Rig, GatedAgent]]:
    agent = GatedAgent()
    async with make_rig(
        tmp_path, monkeypatch, agent.connector, MANAGER_QEMU_AGENT_CHANNEL="vsock"
    ) as made:
        yield made, agent
    agent.drain()


async def test_a_vsock_start_hands_the_manifest_over_before_running(
    vsock_rig: tuple[Rig, GatedAgent],
) -> None:
    rig, agent = vsock_rig
    agent.gate.opened.set()
    machine = rig.admit()
    await rig.start(machine)
    assert machine.history == [A, S, R]
    assert agent.cids == [machine.resources.guest_cid]
    assert agent.drain() == b"{}"


@pytest.mark.parametrize("how", ["cancel", "stop"])
async def test_a_start_ended_during_the_handover_reaps_its_qemu_and_leaves_nothing(
    vsock_rig: tuple[Rig, GatedAgent], how: str
) -> None:
    rig, agent = vsock_rig
    machine = rig.admit()
    task = rig.start(machine)
    await agent.gate.entered.wait()
    assert machine.state is S
    if how == "cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(asyncio.shield(machine.released), 1)
        assert machine.history == [A, S, D]
    else:
        await asyncio.wait_for(machine.stop(StopReason.STOP), 1)
        assert task.cancelled()
        assert machine.history == [A, S, X, D]
    assert "SIGKILL" in rig.launcher.processes[0].signals
    assert rig.left_behind() == NOTHING
    assert agent.drain() == b""  # the manifest never went out


def number_in(argv: list[str], conflict: str) -> int:
    text = " ".join(argv)
    pattern = {
        "host_port": r"hostfwd=tcp::(\d+)-",
        "vnc_display": r"-vnc :(\d+)",
        "guest_cid": r"guest-cid=(\d+)",
    }[conflict]
    found = re.search(pattern, text)
    assert found is not None, (conflict, text)
    return int(found.group(1))


@pytest.mark.parametrize("conflict", ["host_port", "vnc_display", "guest_cid"])
async def test_a_taken_number_is_swapped_and_the_start_retried_once(
    vsock_rig: tuple[Rig, GatedAgent], conflict: str
) -> None:
    rig, agent = vsock_rig
    agent.gate.opened.set()
    gate = rig.launcher.close("wait_ready")
    machine = rig.admit()
    task = rig.start(machine)
    await gate.entered.wait()
    taken = number_in(rig.launcher.processes[0].argv, conflict)
    gate.error = QemuExitedError(
        "QEMU exited during start-up: taken", exit="exit status 1", stderr=[], conflict=conflict
    )
    rig.launcher.gates["wait_ready"] = Gate()  # the next attempt passes
    rig.launcher.gates["wait_ready"].opened.set()
    gate.opened.set()
    await asyncio.wait_for(task, GUARD)
    assert machine.history == [A, S, S, R]
    first, second = rig.launcher.processes
    assert "SIGKILL" in first.signals and second.signals == []
    now = number_in(second.argv, conflict)
    assert now != taken and now == getattr(machine.resources, conflict)
    pools = rig.ctx.pools
    held = {"host_port": pools.ports, "vnc_display": pools.displays, "guest_cid": pools.cids}
    assert held[conflict].held == {now}
    assert pools.cid_owner == {machine.resources.guest_cid: machine.id}
    assert agent.cids == [machine.resources.guest_cid]  # the hand-over went to the new CID
    await machine.stop(StopReason.STOP)
    assert rig.left_behind() == NOTHING
