"""The baselines: what a client does without the manager, measured in the same run.

QEMU started directly with the daemon's own argv (read from /proc), the same per-VM files at
the same paths and its own inherited-fd QMP socket, waiting for the same readiness (greeting,
qmp_capabilities, query-status = running); and a bare grpc.aio health server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.bench.daemon import BenchDaemon
from tests.support.daemon_process import free_port, wait_serving

QMP_ID = "cocos-qmp"

# The bare server of the start-up and RSS baseline: grpc.aio with health, nothing else.
BARE_HEALTH_SERVER = """
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()
asyncio.run(main())
"""

# The libraries the project's card requires and the bare server does without, imported and not
# used: a floor under any daemon built on them (using them costs more, never less). psutil,
# which the OpenTelemetry SDK's resources import whenever it is installed, is a dev dependency
# only (the bench's own environment has it): kept out, so the floor is what an install pays.
CARD_LIBRARIES = (
    "import sys\n"
    "sys.modules['psutil'] = None\n"
    "import pydantic_settings, structlog, opentelemetry.sdk.trace\n"
    "del sys.modules['psutil']\n"
)


def strip_qmp(argv: Sequence[str]) -> list[str]:
    """The daemon's QEMU argv without its inherited-fd QMP monitor."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if (arg == "-chardev" and f"id={QMP_ID}," in nxt) or (
            arg == "-mon" and f"chardev={QMP_ID}," in nxt
        ):
            skip = True
            continue
        out.append(arg)
    return out


class DirectQemu:
    """A client starting QEMU itself: its own listening QMP socket passed as an fd, then the
    same readiness signal as the daemon (greeting, qmp_capabilities, query-status running)."""

    def __init__(self, argv: Sequence[str], socket_path: Path) -> None:
        self.argv = list(argv)
        self.socket_path = socket_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.conn: socket.socket | None = None

    def start(self) -> float:
        """Blocking on purpose: the least a client can do. Returns seconds to ready."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        started = time.perf_counter()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(4)
            fd = listener.fileno()
            self.popen = subprocess.Popen(
                [
                    *self.argv,
                    "-chardev",
                    f"socket,id={QMP_ID},fd={fd},server=on,wait=off",
                    "-mon",
                    f"chardev={QMP_ID},mode=control",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(fd,),
                start_new_session=True,
            )
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(self.socket_path))
        finally:
            listener.close()
        self.conn = conn
        reader = conn.makefile("rb")
        _qmp_line(reader)  # greeting
        conn.sendall(b'{"execute":"qmp_capabilities"}')
        _qmp_line(reader)
        conn.sendall(b'{"execute":"query-status"}')
        reply = json.loads(_qmp_line(reader))
        elapsed = time.perf_counter() - started
        if reply.get("return", {}).get("status") != "running":
            raise RuntimeError(f"direct QEMU is not running: {reply}")
        return elapsed

    def kill(self) -> float:
        """SIGKILL; returns seconds until the parent has reaped it."""
        assert self.popen is not None
        started = time.perf_counter()
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        elapsed = time.perf_counter() - started
        if self.conn is not None:
            self.conn.close()
        return elapsed


def _qmp_line(reader: Any) -> bytes:
    while True:
        line = reader.readline()
        if not line:
            raise RuntimeError("direct QEMU closed its QMP monitor (did it start?)")
        if b'"event"' not in line:
            return bytes(line)


class VmFileStash:
    """Keeps a VM's per-VM files (by hard link) after the daemon removes them, so the direct
    baseline can run the daemon's exact argv with the same files at the same paths."""

    def __init__(self, tmp: Path, stash: Path) -> None:
        self.tmp = tmp
        self.stash = stash
        self.names: list[str] = []

    def keep(self) -> None:
        shutil.rmtree(self.stash, ignore_errors=True)
        self.stash.mkdir(parents=True)
        self.names = []
        for path in self.tmp.iterdir():
            if path.is_file() and not path.name.endswith(".sock"):
                os.link(path, self.stash / path.name)
                self.names.append(path.name)

    def restore(self) -> None:
        for name in self.names:
            target = self.tmp / name
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            if name.startswith("OVMF_VARS"):
                shutil.copyfile(self.stash / name, target)  # the guest writes to it
            else:
                os.link(self.stash / name, target)

    def remove_restored(self) -> None:
        for name in self.names:
            with contextlib.suppress(FileNotFoundError):
                (self.tmp / name).unlink()


async def direct_run(daemon: BenchDaemon, argv: Sequence[str], stash: VmFileStash) -> float:
    stash.restore()
    direct = DirectQemu(strip_qmp(argv), daemon.root / "direct-qmp.sock")
    try:
        return direct.start()
    finally:
        if direct.popen is not None:
            direct.kill()
        stash.remove_restored()


async def direct_burst(daemon: BenchDaemon, argvs: list[list[str]], stash: VmFileStash) -> float:
    """Seconds for a client to start all `argvs` at once, each in its own thread, and see
    every one ready; the VMs are killed and their restored files removed afterwards."""
    stash.restore()
    directs = [
        DirectQemu(strip_qmp(argv), daemon.root / f"direct-{n}.sock")
        for n, argv in enumerate(argvs)
    ]
    loop = asyncio.get_running_loop()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(directs) or 1) as pool:
            started = time.perf_counter()
            await asyncio.gather(*(loop.run_in_executor(pool, d.start) for d in directs))
            return time.perf_counter() - started
    finally:
        for direct in directs:
            if direct.popen is not None:
                direct.kill()
        stash.remove_restored()


async def start_bare_health(
    log_path: Path, *, imports: str = ""
) -> tuple[float, subprocess.Popen[bytes]]:
    """The bare server, `imports` (CARD_LIBRARIES for the floor) run before it."""
    port = free_port()
    with open(log_path, "ab") as out:  # noqa: ASYNC230
        started = time.perf_counter()
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-c", imports + BARE_HEALTH_SERVER, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    elapsed = await wait_serving(port, proc, started + 60, log_path) - started
    return elapsed, proc
