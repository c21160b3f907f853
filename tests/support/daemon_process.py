"""The real `cocos-manager` daemon as a subprocess: the one helper of the tests that kill and
restart it, of `make soak` and of `make bench`.

It runs the installed console script configured only by environment variables (the caller's
MANAGER_*/COCOS_* are dropped, so nothing of a developer's shell leaks in), on a port of its
own on loopback, and is SERVING when `start()` returns. What the soak and the bench read about
it (RSS, descriptors, children, listening ports) is read here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cocos_manager.proto import manager_pb2_grpc as pb_grpc

EXE = str(Path(sys.executable).with_name("cocos-manager"))
PORT_TRIES = 3  # a port picked free was taken before the daemon bound it: another is picked


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_environ() -> dict[str, str]:
    """This process's environment without MANAGER_*/COCOS_* (nor the stand-in QEMU's
    FAKE_QEMU_*) variables: only what the caller sets configures the daemon."""
    prefixes = ("MANAGER_", "COCOS_", "FAKE_QEMU_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


@dataclass
class Daemon:
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> pb_grpc.ManagerServiceStub:
        assert self.channel is not None
        return pb_grpc.ManagerServiceStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def full_env(self) -> dict[str, str]:
        env = clean_environ() | self.env
        env["MANAGER_GRPC_HOST"] = "127.0.0.1"
        env["MANAGER_GRPC_PORT"] = str(self.port)
        env.setdefault("COCOS_JAEGER_URL", "http://127.0.0.1:9/api/traces")
        return env

    async def start(self, timeout: float = 60.0, *, connect: bool = True) -> float:
        """Starts the daemon; returns the seconds from exec to health SERVING. `connect`:
        open `channel` (a grpc.aio channel, bound to the running event loop)."""
        self.port, serving, started = await serve_on_a_port(
            self.port, self._launch, timeout, self.log
        )
        elapsed = serving - started
        if connect:
            self.channel = grpc.aio.insecure_channel(self.address)
        return elapsed

    def _launch(self, port: int) -> Launched:
        """Blocking on purpose: exec is what the bench times, and nothing else runs
        meanwhile."""
        self.port = port
        with open(self.log, "ab") as log:
            earlier = log.tell()  # this attempt's lines follow
            started = time.perf_counter()
            self.process = subprocess.Popen(
                [EXE],
                env=self.full_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                # A session of its own, as systemd starts a service: the scheduler's
                # autogroup then weighs it apart from the client driving it (make bench).
                start_new_session=True,
            )
        return Launched(self.process, started, earlier)

    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def kill(self) -> None:
        """SIGKILL: the daemon dies without any clean-up, as in a crash. Killed before the
        channel closes: closing it cancels calls in flight, and the daemon would clean up
        after a cancelled Run (killing its QEMU) if it got the chance."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        await self.close_channel()

    async def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as systemd stops it; its exit status, or None if it had to be killed."""
        await self.close_channel()
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
            return None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as error:
            return f"(no daemon log: {error})"

    # -- what the soak and the bench read about it -------------------------------------------

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def children(self, recursive: bool = False) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=recursive)
        except psutil.NoSuchProcess:
            return []

    def vm_children(self) -> list[psutil.Process]:
        """The daemon's QEMUs (or what runs them: sudo, a wrapper), not the VMs' console
        keepers, which are its children too."""
        found = []
        for child in self.children():
            with contextlib.suppress(psutil.Error):
                if not any(arg.endswith("console_keeper.py") for arg in child.cmdline()):
                    found.append(child)
        return found

    def zombies_and_live(self) -> tuple[int, int]:
        """(zombies, live) among the daemon's descendants."""
        zombies = live = 0
        for child in self.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() == psutil.STATUS_ZOMBIE:
                    zombies += 1
                else:
                    live += 1
        return zombies, live

    def listening_ports(self) -> list[int]:
        return sorted(
            c.laddr.port
            for c in psutil.Process(self.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        )


_LISTEN_FAILURE = "MANAGER_GRPC_HOST/MANAGER_GRPC_PORT: cannot listen on 127.0.0.1:"


class PortTaken(RuntimeError):
    """Another process had the port the daemon was given: a port picked free and let go can be
    taken before the daemon binds it (by another test's daemon or VM; tests run in parallel)."""


def listens_on(pid: int, port: int) -> bool:
    """Whether `pid` or one of its descendants (the daemon under strace, say) listens on
    `port`."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for member in family:
        with contextlib.suppress(psutil.Error):
            for connection in member.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                    return True
    return False


@dataclass(frozen=True)
class Launched:
    """A daemon just started: its process (or what runs it: strace), when, and where its
    lines begin in the log."""

    process: subprocess.Popen[bytes]
    started: float
    since: int = 0


async def serve_on_a_port(
    port: int, launch: Callable[[int], Launched], timeout: float, log: Path
) -> tuple[int, float, float]:
    """`launch(port)` until its daemon serves on a port of its own: another is picked when
    another process took `port` first. (the port, when SERVING was seen, when it started)"""
    tries = 1
    while True:
        launched = launch(port)
        try:
            serving = await wait_serving(
                port, launched.process, launched.started + timeout, log, since=launched.since
            )
            return port, serving, launched.started
        except PortTaken:
            await asyncio.to_thread(launched.process.wait, timeout)
            if tries == PORT_TRIES:
                raise
            tries, port = tries + 1, free_port()


async def wait_serving(
    port: int,
    process: subprocess.Popen[bytes],
    deadline: float,
    log: Path | None = None,
    since: int = 0,
) -> float:
    """Polls the TCP port every 2 ms, then the gRPC health check, until SERVING, and until the
    port is this daemon's: another process on it (PortTaken) once answered for it, and a test
    drove another test's daemon. Returns when SERVING was seen (perf_counter), before the
    check of whose port it is (about 10 ms of psutil that `make bench` must not count).

    The channel is made only once the port accepts: one made earlier fails its first connect
    and then waits out gRPC's reconnect backoff (a second or more) before asking again.
    """
    channel: grpc.aio.Channel | None = None
    try:
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                said = log.read_bytes()[since:].decode(errors="replace") if log else ""  # noqa: ASYNC240
                if f"{_LISTEN_FAILURE}{port}" in said:
                    raise PortTaken(f"port {port} was taken before the daemon bound it:\n{said}")
                tail = said[-2000:]
                raise RuntimeError(f"daemon exited with {process.returncode} at start:\n{tail}")
            if channel is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        pass
                except OSError:
                    await asyncio.sleep(0.002)
                    continue
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            health = health_pb2_grpc.HealthStub(channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                serving = time.perf_counter()
                if reply.status == health_pb2.HealthCheckResponse.SERVING and listens_on(
                    process.pid, port
                ):
                    return serving  # before the check of whose it is (make bench times it)
            await asyncio.sleep(0.002)
        raise RuntimeError("daemon did not become SERVING in time")
    finally:
        if channel is not None:
            await channel.close()
