"""Faults of the host, the client and QEMU, each against real parts: a real grpc.aio server (in-process, or the
real daemon as a subprocess), the stand-in QEMU as a real process, real tmpfs mounts, real
competing processes on ports, real sockets for agents.

Every test ends by checking that nothing was left behind: no child process or zombie of the
test process, no file in TMP_FILE_LOC, no port, CID or display held in the service's pools,
and an empty computation table. A fault handled with the wrong status but clean books, or the
right status with a leak, both fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from cocos_manager.agent.protocol import MAX_FRAME
from cocos_manager.agent.vsock import AgentEventListener
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from cocos_manager.vm.resources import VNC_BASE_PORT, tcp_port_is_free
from tests.support.daemon_process import Daemon
from tests.support.harness import Manager, base_env, run_request, running_manager
from tests.support.processes import children, gone_within
from tests.support.streams import read_agent
from tests.support.waiting import subscribed, unavailable, wait_for

GUARD = 10.0
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# -- what "nothing left behind" means -----------------------------------------------------------


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def leftovers(m: Manager) -> dict[str, object]:
    """Everything a finished computation could have left; empty when the books are clean."""
    service = m.service
    found: dict[str, object] = {
        "computations": sorted(service.computations()),
        "children": children(),
        "files": listing(Path(m.settings.qemu.TMP_FILE_LOC)),
        "ports": sorted(service._ports.held),
        "cids": sorted(service._cids.held),
        "displays": sorted(service._displays.held),
        "cid map": dict(service._by_cid),
    }
    return {name: value for name, value in found.items() if value}


async def assert_nothing_left(m: Manager, within: float = 5.0) -> None:
    """Clean-up after a cancelled call runs after the client has its answer: allow it a moment."""
    deadline = time.monotonic() + within
    while (left := leftovers(m)) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert left == {}


def starts(log: Path) -> list[dict[str, object]]:
    """The stand-in's FAKE_QEMU_START_LOG: one entry per QEMU started."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def pids_recorded(state: Path) -> list[int]:
    """PIDs in the daemon's VM records: a record names its QEMU once it is STARTING."""
    pids = set()
    for path in state.glob("vm-*.json"):  # two versions of one record for a moment: one PID
        with contextlib.suppress(OSError, ValueError):  # being written or replaced right now
            pids.add(int(json.loads(path.read_text())["pid"]))
    return sorted(pid for pid in pids if pid)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- real environments --------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs at `path` (needs root); unmounted afterwards, which fails if still in use."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def free_run(first: int, last: int, count: int) -> int:
    """The start of `count` consecutive free TCP ports within first..last."""
    for _ in range(200):
        start = random.randint(first, last - count)
        if all(tcp_port_is_free(port) for port in range(start, start + count)):
            return start
    raise RuntimeError("no free port run found")


def big_file(path: Path, size: int) -> str:
    with open(path, "wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            out.write(block)
        out.write(os.urandom(size & ((1 << 20) - 1)))
    return str(path)


async def run_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


# -- MANAGER_MAX_VMS ----------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "runs"), [(1, 2), (3, 4), (2, 9)])
async def test_max_vms_admits_exactly_the_limit_of_concurrent_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, runs: int
) -> None:
    """All Runs arrive at once; a check that read the count before an await would let more in."""
    async with running_manager(tmp_path, monkeypatch, MANAGER_MAX_VMS=str(limit)) as m:
        results = await asyncio.gather(
            *(m.stub.Run(run_request(f"vm-{i}")) for i in range(runs)), return_exceptions=True
        )
        admitted = [r for r in results if isinstance(r, pb.RunResponse)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(admitted) == limit and len(refused) == runs - limit, results
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MANAGER_MAX_VMS" in (error.details() or "")
        running = m.service.computations()
        assert sorted(running) == sorted(r.computation_id for r in admitted)
        assert len({r.agent_port for r in admitted}) == limit
        # The refused ones made no files (each VM: 5 and its console file).
        assert len(listing(m.tmp / "vms")) == 6 * limit

        # A Stop frees a slot at once: the next Run is admitted, and the one after is not.
        await m.stub.Stop(pb.StopRequest(computation_id=admitted[0].computation_id))
        await m.stub.Run(run_request("after-stop"))
        error = await run_error(m.stub.Run(run_request("one-too-many")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        for computation_id in m.service.computations():
            await m.stub.Stop(pb.StopRequest(computation_id=computation_id))
        await assert_nothing_left(m)


async def test_max_vms_counts_starting_vms_and_frees_failed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot is taken at admission, not at readiness, and returned by every way a VM ends."""
    async with running_manager(tmp_path, monkeypatch, MANAGER_MAX_VMS="1") as m:
        monkeypatch.setenv("FAKE_QEMU_MODE", "no-qmp")
        starting = m.stub.Run(run_request("slow"))
        await wait_for(lambda: "slow" in m.service.computations(), "admission")
        error = await run_error(m.stub.Run(run_request("blocked")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await assert_nothing_left(m)

        monkeypatch.setenv("FAKE_QEMU_MODE", "fail")  # a VM that fails to start
        error = await run_error(m.stub.Run(run_request("broken")))
        assert error.code() == grpc.StatusCode.INTERNAL

        monkeypatch.setenv("FAKE_QEMU_MODE", "exit-after:0.3:0")  # a VM that ends on its own
        await m.stub.Run(run_request("brief"))
        await wait_for(lambda: not m.service.computations(), "the VM's own exit")

        monkeypatch.delenv("FAKE_QEMU_MODE")
        await m.stub.Run(run_request("finally"))
        await m.stub.Stop(pb.StopRequest(computation_id="finally"))
        await assert_nothing_left(m)


# -- the client goes away during Run ------------------------------------------------------------


@pytest.mark.parametrize("how", ["client cancel", "stop"])
async def test_run_ended_during_file_preparation_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Images on another filesystem are copied (no hard link), which takes a while in a worker
    thread the cancellation cannot interrupt: whatever it still writes must be removed too."""
    images = tmp_path / "big"
    images.mkdir()
    env = {
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": big_file(images / "bzImage", 48 << 20),
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": big_file(images / "rootfs.cpio.gz", 48 << 20),
        "FAKE_QEMU_START_LOG": str(tmp_path / "starts"),
    }
    with tmpfs(tmp_path / "vms", "256m") as vms:
        async with running_manager(tmp_path, monkeypatch, **env) as m:
            call = m.stub.Run(run_request("copying"))
            await wait_for(lambda: listing(vms), "the first copy")
            if how == "client cancel":
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            else:
                await m.stub.Stop(pb.StopRequest(computation_id="copying"))
                assert (await run_error(call)).code() == grpc.StatusCode.ABORTED
            await assert_nothing_left(m)
            await asyncio.sleep(0.5)  # longer than the copies take: nothing may reappear
            assert listing(vms) == []
            assert starts(tmp_path / "starts") == []  # it ended before QEMU was started


async def test_deadline_while_qemu_starts_kills_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "starts"
    async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_START_LOG=str(log)) as m:
        monkeypatch.setenv("FAKE_QEMU_MODE", "no-qmp")
        call = m.stub.Run(run_request("late"), timeout=6.0)
        # The deadline must fall while QEMU runs: its record names it from STARTING on.
        await wait_for(lambda: pids_recorded(tmp_path / "state"), "QEMU to be spawned", 6.0)
        (pid,) = pids_recorded(tmp_path / "state")
        error = await run_error(call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await assert_nothing_left(m)
        assert not pid_alive(pid)
        assert [entry["pid"] for entry in starts(log)] in ([pid], [])  # [] if killed that early


# -- a port or display taken between the probe and QEMU's bind ----------------------------------


@contextlib.contextmanager
def squatter_reaped(marker: Path) -> Iterator[None]:
    """Kills the process the stand-in started to take the port (it is not our child)."""
    try:
        yield
    finally:
        if marker.exists():
            # The leftover check runs right after, and a kill is not instant.
            gone_within(int(marker.read_text()), GUARD, kill=True)


async def test_host_port_taken_before_qemu_binds_is_retried_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = free_run(20000, 32000, 3)
    marker, log = tmp_path / "squatter", tmp_path / "starts"
    env = {
        "MANAGER_QEMU_HOST_FWD_RANGE": f"{first}-{first + 2}",
        "FAKE_QEMU_SQUAT": f"hostfwd:{marker}",
        "FAKE_QEMU_START_LOG": str(log),
    }
    with squatter_reaped(marker):
        async with running_manager(tmp_path, monkeypatch, **env) as m:
            with capture_logs() as logs:
                response = await m.stub.Run(run_request("moved"))
            port = int(response.agent_port)
            assert port != first and first < port <= first + 2
            assert [entry["hostfwd"] for entry in starts(log)] == [first, port]
            assert marker.exists()  # another process really held the first port ...
            assert await asyncio.to_thread(read_agent, first) == b"squatter"  # ... and still does
            assert json.loads(await asyncio.to_thread(read_agent, port))["id"] == "moved"
            assert m.service._ports.held == {port}
            retried = [e for e in logs if e["event"] == "VM start hit a taken resource; retrying"]
            assert len(retried) == 1 and "host forwarding" in retried[0]["error"]
            await m.stub.Stop(pb.StopRequest(computation_id="moved"))
            await assert_nothing_left(m)


async def test_vnc_display_taken_before_qemu_binds_is_retried_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = free_run(VNC_BASE_PORT + 100, VNC_BASE_PORT + 3000, 2) - VNC_BASE_PORT
    marker, log = tmp_path / "squatter", tmp_path / "starts"
    env = {
        "MANAGER_QEMU_VSOCK_VNC": str(base),
        "FAKE_QEMU_SQUAT": f"vnc:{marker}",
        "FAKE_QEMU_START_LOG": str(log),
    }
    with squatter_reaped(marker):
        async with running_manager(tmp_path, monkeypatch, **env) as m:
            response = await m.stub.Run(run_request("repainted"))
            assert [entry["vnc"] for entry in starts(log)] == [[f":{base}"], [f":{base + 1}"]]
            assert m.service.computations()["repainted"].resources.vnc_display == base + 1
            assert await asyncio.to_thread(read_agent, VNC_BASE_PORT + base) == b"squatter"
            assert json.loads(await asyncio.to_thread(read_agent, int(response.agent_port)))
            await m.stub.Stop(pb.StopRequest(computation_id="repainted"))
            await assert_nothing_left(m)


async def test_taken_port_with_no_other_in_range_is_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_run(20000, 32000, 1)
    marker = tmp_path / "squatter"
    env = {"MANAGER_QEMU_HOST_FWD_RANGE": f"{port}-{port}", "FAKE_QEMU_SQUAT": f"hostfwd:{marker}"}
    with squatter_reaped(marker):
        async with running_manager(tmp_path, monkeypatch, **env) as m:
            error = await run_error(m.stub.Run(run_request("nowhere")))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MANAGER_QEMU_HOST_FWD_RANGE" in (error.details() or "")
            await assert_nothing_left(m)


# -- TMP_FILE_LOC unwritable or full ------------------------------------------------------------


async def test_tmp_file_loc_that_is_a_file_is_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "vms"
    blocker.write_text("not a directory")
    log = tmp_path / "starts"
    async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_START_LOG=str(log)) as m:
        error = await run_error(m.stub.Run(run_request("nowhere")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "MANAGER_QEMU_TMP_FILE_LOC" in (error.details() or "")
        assert str(blocker) in (error.details() or "")
        assert blocker.read_text() == "not a directory" and starts(log) == []
        blocker.unlink()
        await assert_nothing_left(m)


async def test_read_only_tmp_file_loc_is_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "starts"
    with tmpfs(tmp_path / "vms", "1m", read_only=True) as vms:
        async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_START_LOG=str(log)) as m:
            error = await run_error(m.stub.Run(run_request("read-only")))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "MANAGER_QEMU_TMP_FILE_LOC" in (error.details() or "")
            assert "Read-only file system" in (error.details() or "")
            assert listing(vms) == [] and starts(log) == []
            await assert_nothing_left(m)


async def test_full_tmp_file_loc_is_resource_exhausted_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel fits, the rootfs does not: the kernel copy already made must go too."""
    images = tmp_path / "big"
    images.mkdir()
    log = tmp_path / "starts"
    env = {
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": big_file(images / "bzImage", 16 << 10),
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": big_file(images / "rootfs.cpio.gz", 256 << 10),
        "FAKE_QEMU_START_LOG": str(log),
    }
    with tmpfs(tmp_path / "vms", "64k") as vms:
        async with running_manager(tmp_path, monkeypatch, **env) as m:
            for attempt in range(2):  # a failed attempt leaves room for the same failure, not less
                error = await run_error(m.stub.Run(run_request(f"too-big-{attempt}")))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "MANAGER_QEMU_TMP_FILE_LOC" in (error.details() or "")
                assert "no space left" in (error.details() or "")
                assert listing(vms) == [] and starts(log) == []
                await assert_nothing_left(m)
            statvfs = os.statvfs(vms)
            assert statvfs.f_bfree == statvfs.f_blocks  # not a byte of it still in use


# -- images missing -----------------------------------------------------------------------------

IMAGE_VARIABLES = [
    "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
    "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
    "MANAGER_QEMU_OVMF_CODE_FILE",
    "MANAGER_QEMU_OVMF_VARS_FILE",
]


@pytest.mark.parametrize("kind", ["missing", "a directory"])
@pytest.mark.parametrize("variable", IMAGE_VARIABLES)
async def test_missing_image_is_failed_precondition_before_qemu_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, kind: str
) -> None:
    bad = tmp_path / "elsewhere" / "image.bin"
    if kind == "a directory":
        bad.mkdir(parents=True)
    log = tmp_path / "starts"
    env = {variable: str(bad), "FAKE_QEMU_START_LOG": str(log)}
    async with running_manager(tmp_path, monkeypatch, **env) as m:
        error = await run_error(m.stub.Run(run_request("imageless")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.details() or ""
        assert variable in details and str(bad) in details
        assert starts(log) == []  # QEMU was never started
        await assert_nothing_left(m)
        assert listing(m.tmp / "vms") == []


# -- SIGTERM to the real daemon during a Run ----------------------------------------------------


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """The real daemon (tests/support/daemon_process.py), SERVING when the factory returns."""
    started: list[Daemon] = []

    async def start(**env: str) -> Daemon:
        daemon = Daemon(env={**base_env(tmp_path), **env}, log=tmp_path / "daemon.log")
        started.append(daemon)
        await daemon.start(timeout=GUARD)
        return daemon

    yield start
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.kill()


async def test_sigterm_during_a_run_ends_it_and_exits_cleanly(
    tmp_path: Path, daemon_factory: Callable[..., Awaitable[Daemon]]
) -> None:
    """The Run waits for a QEMU that never answers QMP; SIGTERM must not wait for it."""
    log = tmp_path / "starts"
    daemon = await daemon_factory(
        FAKE_QEMU_MODE="no-qmp", MANAGER_QEMU_START_TIMEOUT="60s", FAKE_QEMU_START_LOG=str(log)
    )
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ManagerServiceStub(channel)
        run = asyncio.ensure_future(stub.Run(run_request("interrupted")))
        await wait_for(lambda: starts(log), "QEMU to start")
        await wait_for(lambda: pids_recorded(tmp_path / "state"), "QEMU's record (STARTING)")
        signalled = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        error = await run_error(run)
        returncode = await asyncio.to_thread(daemon.process.wait, 50)
        took = time.monotonic() - signalled
    assert returncode == 0, daemon.log_tail()
    assert took < 30.0, f"shutdown took {took:.1f} s"  # not the 60 s start timeout
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "shutting down" in (error.details() or "")
    (started,) = starts(log)
    assert not pid_alive(int(started["pid"]))  # type: ignore[call-overload]
    assert listing(tmp_path / "vms") == []
    assert children() == []
    assert '"manager stopped"' in daemon.log.read_text()


async def test_sigterm_with_a_running_vm_stops_it(
    tmp_path: Path, daemon_factory: Callable[..., Awaitable[Daemon]]
) -> None:
    log = tmp_path / "starts"
    daemon = await daemon_factory(FAKE_QEMU_START_LOG=str(log))
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ManagerServiceStub(channel)
        events = stub.Events(pb.EventsRequest())
        await subscribed(events)
        await stub.Run(run_request("running"))
        daemon.process.send_signal(signal.SIGTERM)
        async for _ in events:  # the stream ends (not fails) when the daemon stops
            pass
        assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    (started,) = starts(log)
    assert not pid_alive(int(started["pid"]))  # type: ignore[call-overload]
    assert listing(tmp_path / "vms") == []


# -- agents: hostile input and identity ---------------------------------------------------------


def frame(message_id: int, payload: bytes) -> bytes:
    return struct.pack("<II", message_id, len(payload)) + payload


def ack(message_id: int) -> bytes:
    return struct.pack("<I", message_id)


def agent_event(status: str, claimed_id: str) -> bytes:
    message = pb.ClientStreamMessage(
        agent_event=pb.AgentEvent(
            event_type="compute", computation_id=claimed_id, status=status, originator="agent"
        )
    )
    return message.SerializeToString()


class Agents:
    """Agents connected to the daemon's listener over socketpairs, as the daemon wires it."""

    def __init__(self, m: Manager) -> None:
        self.listener = AgentEventListener(
            m.service.computation_for_cid,
            m.service.publish_agent_message,
            pace=m.service.bus.wait_for_room,
        )
        m.service.on_release(self.listener.disconnect)
        self.tasks: list[asyncio.Task[int]] = []

    async def connect(self, cid: int) -> tuple[asyncio.Task[int], Streams]:
        a, b = socket.socketpair()
        manager_side = await asyncio.open_connection(sock=a)
        agent_side = await asyncio.open_connection(sock=b)
        task = asyncio.ensure_future(self.listener.serve(*manager_side, cid))
        self.tasks.append(task)
        return task, agent_side

    async def close(self) -> None:
        await self.listener.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def agents_of(m: Manager) -> AsyncIterator[Agents]:
    agents = Agents(m)
    try:
        yield agents
    finally:
        await agents.close()


class Watcher:
    """An Events subscriber (through gRPC) keeping the agent-sent messages it sees."""

    def __init__(self, m: Manager, computation_id: str) -> None:
        self.call = m.stub.Events(pb.EventsRequest(computation_id=computation_id))
        self.seen: list[pb.ClientStreamMessage] = []
        self._before = m.service.bus.subscriber_count
        self._m = m
        self._task = asyncio.ensure_future(self._collect())

    async def _collect(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for message in self.call:
                if self.from_agent(message):
                    self.seen.append(message)

    @staticmethod
    def from_agent(message: pb.ClientStreamMessage) -> bool:
        """Not the manager's own events, nor QEMU's console lines."""
        if message.HasField("agent_log"):
            return message.agent_log.level == "info-agent"
        return message.HasField("agent_event") and message.agent_event.originator == "agent"

    async def ready(self) -> Watcher:
        await wait_for(lambda: self._m.service.bus.subscriber_count > self._before, "subscribe")
        return self

    def texts(self) -> list[tuple[str, str]]:
        """(what, stamped computation id) of each agent message seen."""
        out = []
        for message in self.seen:
            if message.HasField("agent_log"):
                out.append((message.agent_log.message, message.agent_log.computation_id))
            else:
                out.append((message.agent_event.status, message.agent_event.computation_id))
        return out

    def close(self) -> None:
        self.call.cancel()
        self._task.cancel()


def log_frame(message_id: int, text: str, claimed_id: str = "") -> bytes:
    message = pb.ClientStreamMessage(
        agent_log=pb.AgentLog(message=text, computation_id=claimed_id, level="info-agent")
    )
    return frame(message_id, message.SerializeToString())


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the manager wrote before closing (acks); closing with unread input may reset."""
    try:
        return await asyncio.wait_for(reader.read(), GUARD)
    except ConnectionResetError:
        return b""


def header(message_id: int, length: int) -> bytes:
    return struct.pack("<II", message_id, length)


FRAMED_OK = log_frame(1, "before the fault")
LEGACY_OK = pb.ClientStreamMessage(
    agent_log=pb.AgentLog(message="before the fault", level="info-agent")
).SerializeToString()  # an agent of the original's era: bare messages, no acks
RUN_RES = pb.ClientStreamMessage(run_res=pb.RunResponse(agent_port="1", computation_id="x"))
EOF, RST = b"<eof>", b"<reset>"

# Each stream starts with one valid message (which must arrive), then breaks the contract.
HOSTILE: dict[str, list[bytes]] = {
    "garbage payload": [FRAMED_OK, frame(2, b"\xff\xfe\xfd garbage \x00")],
    "http request": [FRAMED_OK, b"GET / HTTP/1.1\r\nHost: manager\r\n\r\n"],
    "manager-only message": [FRAMED_OK, frame(2, RUN_RES.SerializeToString())],
    "oversized frame": [FRAMED_OK, header(2, MAX_FRAME + 1), b"x" * 65536],
    "huge frame claim": [FRAMED_OK, header(2, 0xFFFFFFFF)],
    "legacy garbage": [LEGACY_OK, b"\x0a\x05\xff\xff\xff\xff\xff"],
    "legacy bad tag": [LEGACY_OK, b"\x42garbage"],
    "oversized legacy": [LEGACY_OK, b"\x0a\xff\xff\xff\xff\x0f"],
    "disconnect mid-frame": [FRAMED_OK, log_frame(2, "cut short")[:11], EOF],
    "disconnect mid-header": [FRAMED_OK, b"\x02\x00\x00", EOF],
    "disconnect mid-legacy": [LEGACY_OK, LEGACY_OK[:5], EOF],
    "reset mid-frame": [FRAMED_OK, log_frame(2, "cut short")[:11], RST],
}


@pytest.mark.parametrize("fault", sorted(HOSTILE))
async def test_hostile_agent_is_dropped_and_the_daemon_unharmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m, agents_of(m) as agents:
        await m.stub.Run(run_request("target"))
        cid = m.service.computations()["target"].resources.guest_cid
        watcher = await Watcher(m, "target").ready()
        good_task, good = await agents.connect(cid)  # a well-behaved agent, open throughout
        bad_task, bad = await agents.connect(cid)

        for chunk in HOSTILE[fault]:
            if chunk == EOF:
                bad[1].write_eof()
            elif chunk == RST:
                sock = bad[1].get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                bad[1].transport.abort()
            else:
                bad[1].write(chunk)
        # What came before the fault is kept, nothing after it. Only when the agent resets the
        # connection may that message be lost too (its ack cannot be written; the agent resends).
        with capture_logs() as logs:
            published = await asyncio.wait_for(bad_task, GUARD)
        assert published == 1 or (RST in HOSTILE[fault] and published == 0)
        kept = [("before the fault", "target")] * published
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1 and warnings[0]["computation_id"] == "target", logs
        if not bad[1].is_closing():  # the manager closed its end: the agent reads to EOF
            acked = await read_until_closed(bad[0])
            assert acked in ((b"" if HOSTILE[fault][0] == LEGACY_OK else ack(1)), b"")
            bad[1].close()

        good[1].write(log_frame(7, "still heard"))
        assert await asyncio.wait_for(good[0].readexactly(4), GUARD) == struct.pack("<I", 7)
        await wait_for(lambda: len(watcher.seen) > len(kept), "the agent messages")
        assert watcher.texts() == [*kept, ("still heard", "target")]
        assert not good_task.done()

        # The daemon is unharmed: it serves Run, Stop and Events as before.
        assert m.service.computations()["target"].process is not None
        second = await Watcher(m, "").ready()
        await m.stub.Run(run_request("after"))
        for computation_id in ("target", "after"):
            await m.stub.Stop(pb.StopRequest(computation_id=computation_id))
        await asyncio.wait([good_task], timeout=GUARD)
        assert good_task.cancelled()  # dropped when its VM stopped ...
        assert await read_until_closed(good[0]) == b""  # ... and the agent is told so
        watcher.close()
        second.close()
        await assert_nothing_left(m)


async def test_a_cid_speaks_only_for_its_own_computation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m, agents_of(m) as agents:
        await m.stub.Run(run_request("alice"))
        await m.stub.Run(run_request("bob"))
        cids = {c: m.service.computations()[c].resources.guest_cid for c in ("alice", "bob")}
        of_alice, of_bob = await Watcher(m, "alice").ready(), await Watcher(m, "bob").ready()

        # alice's agent claims to be bob, in a log, in an event and with no claim at all.
        task, agent = await agents.connect(cids["alice"])
        agent[1].write(log_frame(1, "I am bob", claimed_id="bob"))
        agent[1].write(frame(2, agent_event("bob-finished", "bob")))
        agent[1].write(log_frame(3, "no claim"))
        agent[1].write_eof()
        assert await asyncio.wait_for(task, GUARD) == 3
        await wait_for(lambda: len(of_alice.seen) == 3, "alice's messages")
        assert of_alice.texts() == [
            ("I am bob", "alice"),
            ("bob-finished", "alice"),
            ("no claim", "alice"),
        ]

        # A CID no computation holds is refused: nothing acked, nothing published.
        stranger = max(cids.values()) + 100
        with capture_logs() as logs:
            task, agent = await agents.connect(stranger)
            agent[1].write(log_frame(1, "let me in", claimed_id="bob"))
            assert await asyncio.wait_for(task, GUARD) == 0
        assert await read_until_closed(agent[0]) == b""
        assert [e["cid"] for e in logs if e["log_level"] == "warning"] == [stranger]

        # alice stops: her open connection is dropped, and once carol gets her CID, that CID
        # speaks for carol only.
        task, agent = await agents.connect(cids["alice"])
        await m.stub.Stop(pb.StopRequest(computation_id="alice"))
        await asyncio.wait([task], timeout=GUARD)
        assert task.cancelled() and await read_until_closed(agent[0]) == b""
        assert m.service.computation_for_cid(cids["alice"]) is None
        await m.stub.Run(run_request("carol"))
        assert m.service.computations()["carol"].resources.guest_cid == cids["alice"]
        of_carol = await Watcher(m, "carol").ready()
        task, agent = await agents.connect(cids["alice"])
        agent[1].write(log_frame(1, "I am alice", claimed_id="alice"))
        agent[1].write_eof()
        assert await asyncio.wait_for(task, GUARD) == 1
        await wait_for(lambda: of_carol.seen, "carol's message")
        assert of_carol.texts() == [("I am alice", "carol")]

        # Positive control: bob's own agent is heard by bob's watcher, and only that arrives.
        task, agent = await agents.connect(cids["bob"])
        agent[1].write(log_frame(1, "I am bob"))
        agent[1].write_eof()
        assert await asyncio.wait_for(task, GUARD) == 1
        await wait_for(lambda: of_bob.seen, "bob's message")
        assert of_bob.texts() == [("I am bob", "bob")]
        assert len(of_alice.seen) == 3
        for watcher in (of_alice, of_bob, of_carol):
            watcher.close()
        for computation_id in ("bob", "carol"):
            await m.stub.Stop(pb.StopRequest(computation_id=computation_id))
        await assert_nothing_left(m)
