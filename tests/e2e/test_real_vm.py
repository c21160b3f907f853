"""End to end: the real `cocos-manager` daemon, real QEMU under TCG and the real test guest.

Why this exists: every other test drives a stand-in QEMU, so only a real guest proves
that the command line boots, that the manifest reaches the agent (fw_cfg), that `hostfwd`
reaches the agent's port, that the guest's serial lines reach Events, and that Stop, a guest's
own power-off and a failed start each release everything. Nothing here is skipped: a missing
guest is a failure that says how to build it (`make test` builds it first).

Settings are the README's TCG host: TCG (KVM guests crash on these machines), no SEV, a CPU model
TCG has, the fw_cfg channel (no vhost-vsock here), Debian's OVMF, 512M and one vCPU so that
two guests fit on a 2-core machine. The kernel command line is left at its faithful default
('"earlyprintk=serial console=ttyS0"', quotes included): the guest writes to
/dev/ttyS0 itself, so its lines must arrive whatever the kernel's console ends up being.

One daemon serves the tests that need a working guest (starting one costs about a second and
proves nothing new per test); the unbootable-kernel test needs other settings, so it starts its
own. Each daemon is stopped as systemd stops it (SIGTERM) and must exit 0 leaving no QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.events.messages import computation_of
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.support import daemon_process
from tests.support.daemon_process import free_port
from tests.support.harness import run_request, vnc_display
from tests.support.waiting import subscribed

REPO = Path(__file__).resolve().parents[2]
MANAGER_SERVICE = pb.DESCRIPTOR.services_by_name["ManagerService"].full_name
# The original's -append value: one argv element, both double quotes included.
DEFAULT_KERNEL_CMDLINE = '"earlyprintk=serial console=ttyS0"'
# One TCG boot takes ~8 s alone; two at once on 2 cores, on a busy CI machine, take longer.
BOOT_TIMEOUT = 120.0
DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 60.0
# Deterministic bytes (random ones could, once in a while, look like a multiboot header).
NOT_A_KERNEL = b"cocos e2e: this file is not a Linux kernel\n" * 25_000
# What QEMU (hw/i386/x86.c) says when -kernel has no Linux boot header and -initrd is given.
QEMU_NOT_A_KERNEL_MESSAGE = "linux kernel too old to load a ram disk"

pytestmark = pytest.mark.timeout(300)


# -- environment ---------------------------------------------------------------------------


def guest_images(flavour: str = "") -> tuple[Path, Path]:
    """The test guest (flavour "9p": the one with Debian's generic kernel, which has 9p).
    Missing = a failure naming the command that builds it, never a skip."""
    configured = Path(os.environ.get("TEST_GUEST_DIR") or "build/guest")
    guest = (configured if configured.is_absolute() else REPO / configured) / flavour
    kernel, rootfs = guest / "bzImage", guest / "rootfs.cpio.gz"
    missing = [str(path) for path in (kernel, rootfs) if not path.is_file()]
    if missing:
        pytest.fail(
            f"the e2e test guest is missing ({', '.join(missing)}): build it with `make guest` "
            "(`make test` builds it before running the tests)",
            pytrace=False,
        )
    return kernel, rootfs


def daemon_executable() -> Path:
    """The console script installed next to this interpreter (the venv's `cocos-manager`)."""
    exe = Path(sys.executable).with_name("cocos-manager")
    if not exe.is_file():
        pytest.fail(f"{exe} not found: run `make install`", pytrace=False)
    return exe


def daemon_env(root: Path, overrides: dict[str, str]) -> dict[str, str]:
    """Only what we set: the helper drops MANAGER_*/COCOS_* of the caller's shell and sets
    the gRPC address (loopback, a free port)."""
    kernel, rootfs = guest_images()
    env = {
        "MANAGER_LOG_LEVEL": "info",
        "MANAGER_STATE_DIR": str(root / "state"),
        "MANAGER_QEMU_ENABLE_KVM": "false",
        "MANAGER_QEMU_ENABLE_SEV_SNP": "false",
        "MANAGER_QEMU_CPU": "max",
        "MANAGER_QEMU_SMP_COUNT": "1",
        "MANAGER_QEMU_MEMORY_SIZE": "512M",
        "MANAGER_QEMU_AGENT_CHANNEL": "fw_cfg",
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": str(kernel),
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": str(rootfs),
        "MANAGER_QEMU_TMP_FILE_LOC": str(root / "vms"),
        # Away from :0, which a developer's own VM may hold.
        "MANAGER_QEMU_VSOCK_VNC": str(vnc_display(60)),
        # Nobody listens there: a collector that is down must not matter.
        "COCOS_JAEGER_URL": f"http://127.0.0.1:{free_port()}/api/traces",
    }
    env.update(overrides)
    return env


# -- processes -----------------------------------------------------------------------------


def cmdline(process: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return list(process.cmdline())
    return []


@dataclass
class Vm:
    """One QEMU child of the daemon, as the kernel sees it (not as the daemon reports it)."""

    process: psutil.Process
    argv: list[str]

    def option(self, name: str) -> list[str]:
        return [self.argv[i + 1] for i, arg in enumerate(self.argv[:-1]) if arg == name]

    @property
    def uuid(self) -> str:
        for netdev in self.option("-netdev"):
            match = re.search(
                r"\bid=[^,]*-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b",
                netdev,
            )
            if match:
                return match.group(1)
        raise AssertionError(f"no per-VM uuid in the -netdev id of {self.argv}")


class Daemon(daemon_process.Daemon):
    """The shared daemon helper (tests/support/daemon_process.py) and what these tests read:
    its VM folder, its QEMU children as the kernel sees them."""

    def __init__(self, root: Path, overrides: dict[str, str], log: Path) -> None:
        super().__init__(env=daemon_env(root, overrides), log=log, cwd=root)
        self.vm_dir = Path(self.env["MANAGER_QEMU_TMP_FILE_LOC"])

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- last lines of {self.log} ---\n" + super().log_tail(chars)

    def vm_files(self) -> list[str]:
        return sorted(os.listdir(self.vm_dir)) if self.vm_dir.exists() else []

    def files_of(self, vm: Vm) -> list[Path]:
        return sorted(self.vm_dir / name for name in self.vm_files() if vm.uuid in name)

    def children(self, recursive: bool = True) -> list[psutil.Process]:
        """Live or zombie: a zombie QEMU is a leak too (the original's defect 1)."""
        return super().children(recursive=recursive)

    def strays(self) -> list[psutil.Process]:
        """Any process on the machine whose command line names this daemon's VM folder."""
        marker = str(self.vm_dir)
        found = []
        for process in psutil.process_iter():
            if process.pid != os.getpid() and any(marker in arg for arg in cmdline(process)):
                found.append(process)
        return found

    def vm(self, agent_port: int) -> Vm:
        """The QEMU that forwards this host port (found in /proc, by its -netdev hostfwd)."""
        forward = f"hostfwd=tcp::{agent_port}-:"
        for child in self.children():
            argv = cmdline(child)
            if any(forward in arg for arg in argv):
                return Vm(child, argv)
        raise AssertionError(f"no QEMU child of the daemon forwards port {agent_port}")


def start_daemon(root: Path, **overrides: str) -> Daemon:
    """Starts `cocos-manager` and returns once gRPC health says SERVING."""
    root.mkdir(parents=True, exist_ok=True)
    daemon_executable()
    for attempt in range(3):
        daemon = Daemon(root, overrides, root / f"daemon-{attempt}.log")
        try:
            asyncio.run(daemon.start(DAEMON_START_TIMEOUT, connect=False))
            wait_manager_serving(daemon)
            return daemon
        except RuntimeError as died:
            kill(daemon)
            if "cannot listen" in daemon.log_tail():  # the free port was taken meanwhile
                continue
            raise AssertionError(f"{died}\n{daemon.log_tail()}") from None
        except BaseException:
            kill(daemon)
            raise
    raise AssertionError("the daemon could not listen on a free port three times")


def kill(daemon: Daemon) -> None:
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.process.kill()
        daemon.process.wait()


def wait_manager_serving(daemon: Daemon) -> None:
    """The Manager service SERVING too (the helper waits for the whole server's health)."""
    serving = health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    with grpc.insecure_channel(daemon.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            request = health_pb2.HealthCheckRequest(service=MANAGER_SERVICE)
            try:
                if health.Check(request, timeout=1).status == serving:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the Manager service was not SERVING within {DAEMON_START_TIMEOUT:g}s")


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM, as systemd stops it: exit status 0 and no QEMU left behind, or a failure."""
    vms = daemon.children()
    problems = []
    if daemon.process.poll() is not None:
        problems.append(f"the daemon had died during the tests ({daemon.process.returncode})")
    else:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            code = daemon.process.wait(DAEMON_STOP_TIMEOUT)
            if code != 0:
                problems.append(f"the daemon exited with {code} after SIGTERM, expected 0")
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
            problems.append(f"the daemon did not exit within {DAEMON_STOP_TIMEOUT:g}s of SIGTERM")
    left = {p.pid: p for p in [*vms, *daemon.strays()] if p.is_running()}
    for process in left.values():  # don't leave them to the next run either
        with contextlib.suppress(psutil.Error):
            process.kill()
    if left:
        problems.append(
            "QEMU left behind: " + "; ".join(f"{pid} {cmdline(p)[:3]}" for pid, p in left.items())
        )
    assert not problems, "\n".join(problems) + "\n" + daemon.log_tail()


# -- gRPC helpers ----------------------------------------------------------------------------

Match = Callable[[pb.ClientStreamMessage], bool]


def manager_event(event_type: str, status: str | None = None) -> Match:
    def match(message: pb.ClientStreamMessage) -> bool:
        event = message.agent_event
        return (
            message.HasField("agent_event")
            and event.originator == "manager"
            and event.event_type == event_type
            and (status is None or event.status == status)
        )

    return match


def serial_line(pattern: str) -> Match:
    def match(message: pb.ClientStreamMessage) -> bool:
        return (
            message.HasField("agent_log")
            and re.search(pattern, message.agent_log.message) is not None
        )

    return match


def booted(computation_id: str) -> Match:
    """The guest's line; OVMF's escape codes may precede it, so only its end is pinned."""
    return serial_line(rf"BOOTED {re.escape(computation_id)}$")


class EventWatch:
    """One Events stream, read in the background so that a test can wait for a message."""

    def __init__(self, stub: pb_grpc.ManagerServiceStub, computation_id: str) -> None:
        self.computation_id = computation_id
        self.call = stub.Events(pb.EventsRequest(computation_id=computation_id))
        self.messages: list[pb.ClientStreamMessage] = []
        self.ended: str | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.messages.append(message)
                self._changed.set()
            self.ended = "the stream ended"
        except grpc.aio.AioRpcError as error:
            self.ended = f"the stream failed: {error.code().name} {error.details()}"
        finally:
            self._changed.set()

    def find(self, match: Match) -> pb.ClientStreamMessage | None:
        return next((m for m in self.messages if match(m)), None)

    def serial_lines(self) -> list[str]:
        return [m.agent_log.message for m in self.messages if m.HasField("agent_log")]

    async def wait_for(self, what: str, match: Match, timeout: float) -> pb.ClientStreamMessage:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self._changed.clear()
            found = self.find(match)
            if found is not None:
                return found
            remaining = deadline - asyncio.get_running_loop().time()
            if self.ended is not None or remaining <= 0:
                recent = "\n".join(str(m).strip().replace("\n", " ") for m in self.messages[-8:])
                why = self.ended or f"not within {timeout:g}s"
                raise AssertionError(
                    f"no {what} on Events for {self.computation_id!r} ({why}); "
                    f"{len(self.messages)} messages, the last ones:\n{recent}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


@contextlib.asynccontextmanager
async def watch_events(
    stub: pb_grpc.ManagerServiceStub, computation_id: str
) -> AsyncIterator[EventWatch]:
    """Subscribes before the Run it watches.

    The server sends its initial metadata right after registering the subscription, so
    awaiting it is the acknowledgement; tests also assert that `vm-provision starting`
    (published inside Run) was seen.
    """
    watch = EventWatch(stub, computation_id)
    await subscribed(watch.call)
    try:
        yield watch
    finally:
        await watch.close()


@contextlib.asynccontextmanager
async def stopping_leftovers(stub: pb_grpc.ManagerServiceStub, *ids: str) -> AsyncIterator[None]:
    """A failing test must not leave a VM to the next tests, which share the daemon."""
    try:
        yield
    finally:
        for computation_id in ids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Stop(pb.StopRequest(computation_id=computation_id), timeout=60)


async def read_agent(port: int, timeout: float = BOOT_TIMEOUT) -> bytes:
    """What the agent serves on the forwarded host port, once it serves anything.

    Until the guest listens, slirp's hostfwd accepts a connection and closes it with no data
    (or resets it): empty reads and resets mean "not yet", never "wrong".
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no attempt"
    while loop.time() < deadline:
        data = b""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
            try:
                data = await asyncio.wait_for(reader.read(), 3)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            last = "connected, read nothing"
        except (OSError, TimeoutError) as error:
            last = repr(error)
        if data:
            return data
        await asyncio.sleep(0.2)
    raise AssertionError(f"nothing served on 127.0.0.1:{port} within {timeout:g}s ({last})")


def assert_gone(vm: Vm, files: list[Path], daemon: Daemon) -> None:
    """QEMU reaped (not even a zombie: is_running is true for one) and its files removed."""
    assert not vm.process.is_running(), f"QEMU {vm.process.pid} still exists after it ended"
    assert [str(path) for path in files if path.exists()] == []
    assert daemon.vm_files() == [], "per-VM files left in MANAGER_QEMU_TMP_FILE_LOC"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    started = start_daemon(tmp_path_factory.mktemp("e2e-daemon"))
    try:
        yield started
    finally:
        stop_daemon(started)


@pytest.fixture
async def stub(daemon: Daemon) -> AsyncIterator[pb_grpc.ManagerServiceStub]:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        yield pb_grpc.ManagerServiceStub(channel)
    assert daemon.process.poll() is None, f"the daemon died\n{daemon.log_tail()}"


# -- tests -----------------------------------------------------------------------------------


async def test_run_serves_the_manifest_streams_serial_and_stop_releases_all(
    daemon: Daemon, stub: pb_grpc.ManagerServiceStub
) -> None:
    request = run_request("e2e-one")
    cid = request.id
    async with stopping_leftovers(stub, cid), watch_events(stub, cid) as events:
        response = await stub.Run(request, timeout=BOOT_TIMEOUT)
        assert response.computation_id == cid
        port = int(response.agent_port)
        vm = daemon.vm(port)
        # The faithful default command line (its -append value): the guest must still be heard.
        assert vm.option("-append") == [DEFAULT_KERNEL_CMDLINE]
        complete = await events.wait_for(
            "vm-provision complete", manager_event("vm-provision", "complete"), 5
        )
        details = json.loads(complete.agent_event.details)
        assert details["pid"] == vm.process.pid
        assert details["agent_port"] == port
        # The per-VM copies of the original's derivation, and the manifest handed over through fw_cfg.
        files = daemon.files_of(vm)
        assert vm.option("-kernel") == [str(daemon.vm_dir / f"bzImage-{vm.uuid}")]
        assert vm.option("-initrd") == [str(daemon.vm_dir / f"rootfs.cpio-{vm.uuid}.gz")]
        assert any(f"file={daemon.vm_dir}/OVMF_VARS-{vm.uuid}.fd" in d for d in vm.option("-drive"))
        assert {str(p) for p in files} >= {*vm.option("-kernel"), *vm.option("-initrd")}

        assert await read_agent(port) == manifest_json(request)
        await events.wait_for(f"'BOOTED {cid}'", booted(cid), 10)
        assert events.find(manager_event("vm-provision", "starting")) is not None
        assert {computation_of(m) for m in events.messages} == {cid}

        await stub.Stop(pb.StopRequest(computation_id=cid), timeout=60)
        assert_gone(vm, files, daemon)
        await events.wait_for("vm-stop complete", manager_event("vm-stop", "complete"), 5)


async def test_two_vms_at_once_each_serve_their_own_manifest(
    daemon: Daemon, stub: pb_grpc.ManagerServiceStub
) -> None:
    requests = [run_request("e2e-a", datasets=1), run_request("e2e-b", datasets=2)]
    expected = [manifest_json(r) for r in requests]
    assert expected[0] != expected[1]
    async with stopping_leftovers(stub, *(r.id for r in requests)):
        responses = await asyncio.gather(*(stub.Run(r, timeout=BOOT_TIMEOUT) for r in requests))
        assert [r.computation_id for r in responses] == [r.id for r in requests]
        ports = [int(r.agent_port) for r in responses]
        assert ports[0] != ports[1]
        vms = [daemon.vm(port) for port in ports]
        assert vms[0].process.pid != vms[1].process.pid
        files = [daemon.files_of(vm) for vm in vms]

        assert list(await asyncio.gather(*(read_agent(port) for port in ports))) == expected

        await asyncio.gather(
            *(stub.Stop(pb.StopRequest(computation_id=r.id), timeout=60) for r in requests)
        )
        for vm, owned in zip(vms, files, strict=True):
            assert_gone(vm, owned, daemon)


async def test_a_guest_that_powers_off_is_reported_released_and_can_run_again(
    daemon: Daemon, stub: pb_grpc.ManagerServiceStub
) -> None:
    cid = "e2e-poweroff"
    first = run_request(cid, description="cocos-test:poweroff (the test guest powers off)")
    async with stopping_leftovers(stub, cid), watch_events(stub, cid) as events:
        response = await stub.Run(first, timeout=BOOT_TIMEOUT)
        vm = daemon.vm(int(response.agent_port))
        files = daemon.files_of(vm)

        message = await events.wait_for("vm-exit", manager_event("vm-exit"), BOOT_TIMEOUT)
        event = message.agent_event
        assert event.computation_id == cid
        assert event.status == "complete", event
        details = json.loads(event.details)
        assert details["returncode"] == 0, details
        assert any(line.endswith(f"POWEROFF {cid}") for line in details["last_lines"]), details
        assert_gone(vm, files, daemon)  # released before the event went out

        again = run_request(cid, description="second run, stays up")
        response = await stub.Run(again, timeout=BOOT_TIMEOUT)
        vm = daemon.vm(int(response.agent_port))
        files = daemon.files_of(vm)
        assert await read_agent(int(response.agent_port)) == manifest_json(again)
        await stub.Stop(pb.StopRequest(computation_id=cid), timeout=60)
        assert_gone(vm, files, daemon)


async def test_serial_lines_reach_events_without_terminal_escape_codes(
    daemon: Daemon, stub: pb_grpc.ManagerServiceStub
) -> None:
    """OVMF writes terminal control sequences to the serial line (ESC [ = 3 h, set screen mode)
    around the guest's output; Events carries text for clients and logs, so they must go."""
    cid = "e2e-tty"
    async with stopping_leftovers(stub, cid), watch_events(stub, cid) as events:
        await stub.Run(run_request(cid), timeout=BOOT_TIMEOUT)
        await events.wait_for(f"'BOOTED {cid}'", booted(cid), BOOT_TIMEOUT)
        await stub.Stop(pb.StopRequest(computation_id=cid), timeout=60)
    assert f"BOOTED {cid}" in events.serial_lines()
    dirty = [line for line in events.serial_lines() if "\x1b" in line]
    assert dirty == [], f"{len(dirty)} serial lines on Events still carry escape codes"


async def test_an_unbootable_kernel_fails_run_with_qemus_message_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    garbage = tmp_path / "not-a-kernel"
    garbage.write_bytes(NOT_A_KERNEL)
    own = await asyncio.to_thread(
        start_daemon,
        tmp_path / "daemon",
        MANAGER_QEMU_DISK_IMG_KERNEL_FILE=str(garbage),
        MANAGER_QEMU_VSOCK_VNC=str(vnc_display(80)),  # apart from the shared daemon's displays
    )
    cid = "e2e-bad-kernel"
    try:
        async with grpc.aio.insecure_channel(own.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            async with watch_events(stub, cid) as events:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Run(run_request(cid), timeout=BOOT_TIMEOUT)
                elapsed = time.monotonic() - started
                failed = await events.wait_for(
                    "vm-provision failed", manager_event("vm-provision", "failed"), 5
                )
        assert info.value.code() == grpc.StatusCode.INTERNAL, info.value
        assert QEMU_NOT_A_KERNEL_MESSAGE in (info.value.details() or ""), info.value.details()
        assert elapsed < 10, f"Run took {elapsed:.1f}s to report a QEMU that died at once"
        assert QEMU_NOT_A_KERNEL_MESSAGE in json.loads(failed.agent_event.details)["error"]
        assert own.vm_files() == [], "per-VM files left in MANAGER_QEMU_TMP_FILE_LOC"
        assert own.children() == [], "a QEMU child is left"
    finally:
        await asyncio.to_thread(stop_daemon, own)
