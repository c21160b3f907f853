"""Three lifecycle contracts, held through the public API (Run, Stop, Events) with the stand-in
QEMU, at the exact instants where a start used to lose track of its VM:

- a QEMU that ends right as its agent takes the manifest is never reported running for ever;
- a Stop that comes while a failing start tears its VM down answers only once all of it is
  released, and the Run keeps its own error;
- a Run cancelled, or a daemon killed, right after QEMU's spawn leaves no QEMU running that
  nobody owns, and no record behind.

Each instant is reached by what marks it, never by sleeping: the manifest connection's close
(the stand-in agent kills QEMU there and blocks the loop until QEMU has ended, so the exit is
there before the manager looks again); QEMU's end, seen through a pidfd (the Stop is made
from that callback); QemuProcess.attach_output, which the manager calls only for a
just-spawned QEMU's output (its console file: intercepted in this loop to cancel the Run, and
in a daemon subprocess by a sitecustomize on its PYTHONPATH to SIGKILL it), the one manager
method patched, and only to act at the instant the manager reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.agent.vsock import Connect
from cocos_manager.errors import ManagerError
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu.process import QemuProcess
from tests.support.daemon_process import Daemon
from tests.support.harness import (
    FAKE_QEMU,
    Manager,
    base_env,
    run_request,
    running_manager,
    vnc_display,
)
from tests.support.processes import console_keepers, gone_within, processes_mentioning

HELPER_MARKER = "fake-qemu-output-helper"


# -- processes, seen from /proc ----------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def direct_qemu(tmp_path: Path) -> str:
    """The stand-in started by the interpreter itself (one exec), not through `env` and a
    version manager's shell shim: its command line is its own from the moment it is spawned,
    and no shell in between can die of a closed pipe."""
    qemu = tmp_path / "bin" / "qemu-system-x86_64"
    qemu.parent.mkdir(exist_ok=True)
    qemu.write_text(
        f"#!{sys.executable} -u\n"
        "import runpy, sys\n"
        f"sys.argv[0] = {str(FAKE_QEMU)!r}\n"
        f"runpy.run_path({str(FAKE_QEMU)!r}, run_name='__main__')\n"
    )
    qemu.chmod(0o755)
    return str(qemu)  # MANAGER_QEMU_BIN_PATH


def qemu_pids(vms: Path) -> list[int]:
    """The stand-in QEMUs (not their helpers) of the VMs under `vms`."""
    return [
        pid
        for pid in processes_mentioning(str(vms))
        if "qemu-system-x86_64" in (line := _cmdline(pid)) and HELPER_MARKER not in line
    ]


async def kill_helpers(vms: Path) -> None:
    """The output helpers outlive their QEMU on purpose (FAKE_QEMU_MODE=output-helper)."""
    helpers = [pid for pid in processes_mentioning(str(vms)) if HELPER_MARKER in _cmdline(pid)]
    keepers = console_keepers(str(vms))
    for pid in helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await asyncio.gather(*map(ended, helpers))
    # The console keepers held QEMU's output with them: they end at its end of file.
    await asyncio.wait_for(asyncio.gather(*map(ended, keepers)), 10)


def ended(pid: int) -> asyncio.Future[None]:
    """Done once `pid` has ended (its pidfd is readable; nobody is reaped here)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        done.set_result(None)
        return done

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    return done


async def rpc(call: Any) -> grpc.StatusCode:
    """The status a unary call ends with (OK when it answers)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def outcome(call: Awaitable[object]) -> grpc.StatusCode:
    """The status a call of the service in this loop ends with, as gRPC would answer it."""
    try:
        await call
    except ManagerError as error:
        return error.code
    return grpc.StatusCode.OK


def vm_records(state: Path) -> list[str]:
    return sorted(path.name for path in state.glob("vm-*.json"))


# -- the agent's vsock port, stood in by one UNIX socket ----------------------------------------


class Agent:
    """The guest agent: takes one manifest per connection. `connector` is the manager's way to
    reach it (this host has no vhost-vsock); `on_connect` runs first on each connection."""

    def __init__(self, root: Path) -> None:
        self.path = str(root / "agent.sock")
        self.manifests: asyncio.Queue[bytes] = asyncio.Queue()
        self.on_connect: Callable[[], None] | None = None
        self.wrap: Callable[[asyncio.StreamWriter], Any] | None = None

    async def serve(self) -> asyncio.Server:
        return await asyncio.start_unix_server(self._take, self.path)

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.manifests.put_nowait(await reader.read())
        writer.close()

    def connector(self, cid: int) -> Connect:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if self.on_connect is not None:
                self.on_connect()
            reader, writer = await asyncio.open_unix_connection(self.path)
            return reader, (self.wrap(writer) if self.wrap is not None else writer)

        return connect


class EndsQemuAsTheAgentAnswers:
    """The manager's end of the manifest connection. When its close completes (the agent has
    the manifest), QEMU is killed and has ended before the manager's event loop looks again:
    the exit is there, unseen, as the hand-over succeeds."""

    def __init__(self, writer: asyncio.StreamWriter, agent: Agent, vms: Path) -> None:
        self._writer = writer
        self._agent = agent
        self._vms = vms

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def can_write_eof(self) -> bool:
        return self._writer.can_write_eof()

    def write_eof(self) -> None:
        self._writer.write_eof()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()
        manifest = await self._agent.manifests.get()  # the agent took it
        self._agent.manifests.put_nowait(manifest)
        (pid,) = qemu_pids(self._vms)
        # Blocking on purpose: the loop must not run until QEMU has ended.
        assert gone_within(pid, 30, kill=True), f"QEMU {pid} did not end on SIGKILL"


# Below the kernel's ephemeral ports (32768 up): a free ephemeral port can be taken by any
# outgoing connection of another test worker before the stand-in binds it, and the stand-in of
# the crash test, whose daemon is dead by then, cannot be moved to another port.
# Each call takes the next ones, so no test meets a port a previous one left in TIME_WAIT.
_own_ports = iter(range(28000 + vnc_display(0), 28000 + vnc_display(200)))


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))  # as the stand-in binds
        except OSError:
            return False
    return True


def own_ports() -> dict[str, str]:
    """A host port range of one port, and a VNC display, no other test uses: a VM whose port
    is still held makes the next Run fail, whatever its id, and no QEMU of another test takes
    this one's ports from under it."""
    free = (p for p in _own_ports if _bindable(p))
    port, vnc = next(free), next(free)
    return {
        "MANAGER_QEMU_HOST_FWD_RANGE": f"{port}-{port}",
        "MANAGER_QEMU_VSOCK_VNC": str(vnc - 5900),
    }


def manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent: Agent | None = None
) -> AbstractAsyncContextManager[Manager]:
    """A manager in this loop with the directly started stand-in and ports of its own; with
    an `agent`, on the vsock agent channel (reaching it through `agent.connector`)."""
    ports = own_ports()
    return running_manager(
        tmp_path,
        monkeypatch,
        agent_connector=agent.connector if agent is not None else None,
        MANAGER_QEMU_AGENT_CHANNEL="vsock" if agent is not None else "fw_cfg",
        MANAGER_QEMU_HOST_FWD_RANGE=ports["MANAGER_QEMU_HOST_FWD_RANGE"],
        MANAGER_QEMU_VSOCK_VNC=ports["MANAGER_QEMU_VSOCK_VNC"],
        MANAGER_QEMU_BIN_PATH=direct_qemu(tmp_path),
    )


# -- 1. a QEMU that ends right after the hand-over ----------------------------------------------


async def test_a_qemu_ending_as_its_agent_takes_the_manifest_is_never_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Run whose QEMU ends at the instant the agent has the manifest either fails, or is
    followed by vm-exit; either way nothing of the VM stays held: the same id and the one host
    port are free for the next Run."""
    vms = tmp_path / "vms"
    agent = Agent(tmp_path)
    server = await agent.serve()
    agent.wrap = lambda writer: EndsQemuAsTheAgentAnswers(writer, agent, vms)
    async with (
        server,
        manager(tmp_path, monkeypatch, agent) as m,
    ):
        events = m.service.subscribe("ghost")
        try:
            run_error: grpc.aio.AioRpcError | None = None
            try:
                await m.stub.Run(run_request("ghost"), timeout=60)
            except grpc.aio.AioRpcError as error:
                run_error = error
            assert qemu_pids(vms) == []
            if run_error is None:  # answered: its end must be told, and all of it released

                async def vm_exit() -> pb.AgentEvent:
                    async for message in events:
                        event = message.agent_event
                        if message.HasField("agent_event") and event.event_type == "vm-exit":
                            return event
                    raise AssertionError("Events ended without vm-exit")

                try:
                    await asyncio.wait_for(vm_exit(), 10)
                except TimeoutError:
                    raise AssertionError(
                        "Run answered OK for a QEMU that had already ended, and no vm-exit "
                        f"followed: the VM is reported running ({sorted(m.service.computations())})"
                    ) from None
        finally:
            events.close()
        agent.wrap = None
        again = await rpc(m.stub.Run(run_request("ghost"), timeout=60))
        assert again == grpc.StatusCode.OK, "the id or the port of the ended VM is still held"
        assert await rpc(m.stub.Stop(pb.StopRequest(computation_id="ghost"))) == (
            grpc.StatusCode.OK
        )


# -- 2. Stop during a failing start's teardown --------------------------------------------------


async def test_stop_during_a_failing_starts_teardown_answers_once_all_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-over fails (this host refuses vsock), so the start tears its VM down; QEMU has a
    helper that keeps its output open (the teardown waits for QEMU's last lines). A Stop made
    the moment QEMU has ended (through the service, in this loop: the instant is exact)
    answers only once the VM is released, or NOT_FOUND if it already is: the instant it
    answers, the same id and the one host port are free for a Run. The Run keeps the error it
    has without a Stop."""
    vms = tmp_path / "vms"
    agent = Agent(tmp_path)
    server = await agent.serve()
    stopping: list[asyncio.Task[tuple[grpc.StatusCode, grpc.StatusCode]]] = []

    def refuse() -> None:
        raise PermissionError(errno.EACCES, "vsock refused by this host (stand-in)")

    try:
        async with (
            server,
            manager(tmp_path, monkeypatch, agent) as m,
        ):
            monkeypatch.setenv("FAKE_QEMU_MODE", "output-helper")
            agent.on_connect = refuse
            own = await rpc(m.stub.Run(run_request("alone"), timeout=60))
            assert own not in (grpc.StatusCode.OK, grpc.StatusCode.ABORTED)

            async def stop_then_run_again() -> tuple[grpc.StatusCode, grpc.StatusCode]:
                """Stop; the instant it answers, a Run of the same id (the agent works now)."""
                stopped = await outcome(m.service.stop("failing"))
                monkeypatch.setenv("FAKE_QEMU_MODE", "")
                agent.on_connect = None
                return stopped, await outcome(m.service.run(run_request("failing")))

            def stop_once_qemu_ends() -> None:
                (pid,) = qemu_pids(vms)
                ended(pid).add_done_callback(
                    lambda _: stopping.append(asyncio.ensure_future(stop_then_run_again()))
                )
                refuse()

            agent.on_connect = stop_once_qemu_ends
            run = await rpc(m.stub.Run(run_request("failing"), timeout=60))
            assert len(stopping) == 1, "QEMU did not end"
            stopped, again = await stopping[0]
            assert stopped in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
            assert (run, again) == (own, grpc.StatusCode.OK), (
                f"Stop answered {stopped.name}; then the Run answered {run.name} (alone: "
                f"{own.name}), and a Run of the same id at once {again.name}"
            )
            assert await outcome(m.service.stop("failing")) == grpc.StatusCode.OK
    finally:
        await kill_helpers(vms)


# -- 3. right after the spawn: a cancelled Run, a killed daemon ---------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_run_cancelled_while_qemu_output_is_connected_leaves_no_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The Run is cancelled (its caller went away) at the instant the manager connects the new
    QEMU's output (its console file's reader), just before or just after: that QEMU is gone
    when the Run ends, and the id is free."""
    vms = tmp_path / "vms"
    attach_output = QemuProcess.attach_output
    calls = 0
    run: asyncio.Future[pb.RunResponse] | None = None

    async def cancel_the_run_here(process: QemuProcess) -> None:
        nonlocal calls
        calls += 1
        if when == "before" and run is not None:
            run.cancel()
        await attach_output(process)
        if when == "after" and run is not None:
            run.cancel()

    async with manager(tmp_path, monkeypatch) as m:
        monkeypatch.setattr(QemuProcess, "attach_output", cancel_the_run_here)
        run = asyncio.ensure_future(m.service.run(run_request("cancelled")))
        with pytest.raises(asyncio.CancelledError):
            await run
        monkeypatch.setattr(QemuProcess, "attach_output", attach_output)
        assert calls == 1, "the manager never connected QEMU's output"
        assert qemu_pids(vms) == [], "the cancelled Run left its QEMU running, nobody's"
        assert m.service.computations() == {}
        assert vm_records(tmp_path / "state") == []
        assert await rpc(m.stub.Run(run_request("cancelled"), timeout=60)) == grpc.StatusCode.OK


CRASH_HOOK = """
import os, signal

from cocos_manager.qemu.process import QemuProcess


async def _die(self):
    os.kill(os.getpid(), signal.SIGKILL)


# The daemon connects the output of the QEMU it has just spawned.
QemuProcess.attach_output = _die
"""


async def test_a_daemon_killed_right_after_the_spawn_leaves_nothing_after_its_restart(
    tmp_path: Path,
) -> None:
    """The daemon dies by SIGKILL at the instant it connects the QEMU it has just spawned (a
    sitecustomize on its PYTHONPATH kills it there). The next start finds that QEMU and ends
    it: no QEMU runs that nobody owns, and no record is left."""
    vms, state = tmp_path / "vms", tmp_path / "state"
    hook = tmp_path / "crash_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    env = {**base_env(tmp_path), **own_ports(), "MANAGER_QEMU_BIN_PATH": direct_qemu(tmp_path)}
    python_path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    first = Daemon(env={**env, "PYTHONPATH": python_path}, log=tmp_path / "first.log")
    again = Daemon(env=env, log=tmp_path / "again.log")
    try:
        await first.start()
        assert first.process is not None
        run = await rpc(first.stub.Run(run_request("crash"), timeout=60))
        assert run != grpc.StatusCode.OK, "the daemon was not killed at the spawn"
        await asyncio.to_thread(first.process.wait, 30)
        assert first.process.returncode == -signal.SIGKILL
        await first.close_channel()
        # Spawned in a session of its own, it outlived the daemon.
        pids = qemu_pids(vms)
        assert pids, "no QEMU was spawned"
        await again.start()
        try:
            await asyncio.wait_for(asyncio.gather(*map(ended, pids)), 10)
        except TimeoutError:
            raise AssertionError(
                f"QEMU {qemu_pids(vms)} runs on after the restart, nobody's; "
                f"records: {vm_records(state)}"
            ) from None
        assert vm_records(state) == []
        assert await rpc(again.stub.Stop(pb.StopRequest(computation_id="crash"))) == (
            grpc.StatusCode.NOT_FOUND
        )
    finally:
        for daemon in (first, again):
            if daemon.process is not None and daemon.process.poll() is None:
                await daemon.terminate()
        left = qemu_pids(vms)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*map(ended, left))
