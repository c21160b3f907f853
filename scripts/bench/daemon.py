"""The real daemon as the bench drives it: tests/support/daemon_process.Daemon (the helper the
tests and the soak use) configured for real QEMU under TCG, with an Events subscription."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from scripts.bench.common import OVMF_CODE, OVMF_VARS, run_request, vnc_base
from tests.support.daemon_process import Daemon


class Events:
    """One Events subscription of the bench: manager events as they arrive, with the time."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.ManagerServiceStub(channel)
        self._call: Any = None
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Callable[[pb.ClientStreamMessage], bool], asyncio.Future[Any]]]
        self._waiters = []

    async def start(self) -> None:
        self._call = self._stub.Events(pb.EventsRequest())
        self._task = asyncio.ensure_future(self._consume())

    async def _consume(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for message in self._call:
                now = time.perf_counter()
                for match, future in list(self._waiters):
                    if not future.done() and match(message):
                        future.set_result((now, message))

    def expect(
        self, computation_id: str, event_type: str, status: str | None = None
    ) -> asyncio.Future[tuple[float, pb.ClientStreamMessage]]:
        """A future for the next matching manager event (register before causing it)."""

        def match(message: pb.ClientStreamMessage) -> bool:
            event = message.agent_event
            return (
                message.WhichOneof("message") == "agent_event"
                and event.computation_id == computation_id
                and event.event_type == event_type
                and (status is None or event.status == status)
            )

        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, future))
        future.add_done_callback(lambda f: self._waiters.remove((match, f)))
        return future

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task


@dataclass
class DaemonConfig:
    name: str
    qemu_bin: str
    kernel: Path
    rootfs: Path
    memory: str = "1024M"
    vnc_span: int = 64
    extra: dict[str, str] = field(default_factory=dict)

    def renamed(self, name: str) -> DaemonConfig:
        return DaemonConfig(**{**self.__dict__, "name": name})


def daemon_env(config: DaemonConfig, root: Path, jaeger_port: int) -> dict[str, str]:
    return {
        "MANAGER_INSTANCE_ID": f"bench-{config.name}",
        "MANAGER_STATE_DIR": str(root / "state"),
        "COCOS_JAEGER_URL": f"http://127.0.0.1:{jaeger_port}/api/traces",
        "MANAGER_QEMU_BIN_PATH": config.qemu_bin,
        "MANAGER_QEMU_TMP_FILE_LOC": str(root / "vms"),
        "MANAGER_QEMU_ENABLE_KVM": "false",
        "MANAGER_QEMU_ENABLE_SEV": "false",
        "MANAGER_QEMU_ENABLE_SEV_SNP": "false",
        "MANAGER_QEMU_CPU": "max",
        "MANAGER_QEMU_SMP_COUNT": "1",
        "MANAGER_QEMU_MEMORY_SIZE": config.memory,
        "MANAGER_QEMU_AGENT_CHANNEL": "fw_cfg",
        "MANAGER_QEMU_OVMF_CODE_FILE": OVMF_CODE,
        "MANAGER_QEMU_OVMF_VARS_FILE": OVMF_VARS,
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": str(config.kernel),
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": str(config.rootfs),
        "MANAGER_QEMU_VSOCK_VNC": str(vnc_base(config.vnc_span)),
        "MANAGER_QEMU_START_TIMEOUT": "120s",
        "MANAGER_QEMU_STOP_TIMEOUT": "10s",
        **config.extra,
    }


class BenchDaemon(Daemon):
    """The shared helper, in a folder of its own under the bench's work directory."""

    def __init__(self, config: DaemonConfig, work: Path, jaeger_port: int) -> None:
        self.config = config
        self.root = work / config.name
        self.tmp = self.root / "vms"
        self.root.mkdir(parents=True, exist_ok=True)
        super().__init__(
            env=daemon_env(config, self.root, jaeger_port),
            log=self.root / "daemon.log",
            cwd=self.root,
        )
        self.events: Events | None = None
        self.sync_channel: grpc.Channel | None = None

    async def start_serving(self, *, subscribe: bool = True) -> float:
        """Seconds from exec to health SERVING; then subscribes to Events."""
        elapsed = await self.start()
        self.sync_channel = grpc.insecure_channel(self.address)
        if subscribe:
            assert self.channel is not None
            self.events = Events(self.channel)
            await self.events.start()
        return elapsed

    def qemu_for_port(self, port: int) -> psutil.Process:
        marker = f"hostfwd=tcp::{port}-:"
        for child in self.children():
            with contextlib.suppress(psutil.Error):
                if any(marker in arg for arg in child.cmdline()):
                    return child
        raise RuntimeError(f"no QEMU child of the daemon forwards port {port}")

    async def run(self, computation_id: str) -> tuple[float, pb.RunResponse]:
        started = time.perf_counter()
        response = await self.stub.Run(run_request(computation_id), timeout=180)
        return time.perf_counter() - started, response

    def run_blocking(self, computation_id: str) -> tuple[float, pb.RunResponse]:
        """A Run from a thread of its own (the blocking stub), as a client with one thread per
        request makes it."""
        assert self.sync_channel is not None
        stub = pb_grpc.ManagerServiceStub(self.sync_channel)
        started = time.perf_counter()
        response = stub.Run(run_request(computation_id), timeout=180)
        return time.perf_counter() - started, response

    async def stop_vm(self, computation_id: str) -> float:
        started = time.perf_counter()
        await self.stub.Stop(pb.StopRequest(computation_id=computation_id), timeout=60)
        return time.perf_counter() - started

    async def warm_up(self) -> None:
        """First-use costs (page cache, lazy imports, QEMU's first start) out of the figures;
        also makes sure the Events subscription is live before anything expects from it."""
        assert self.events is not None
        for attempt in range(20):
            cid = f"warm-up-{attempt}"
            complete = self.events.expect(cid, "vm-provision", "complete")
            await self.run(cid)
            await self.stop_vm(cid)
            try:
                await asyncio.wait_for(complete, 1.0)
                return
            except TimeoutError:
                continue
        raise RuntimeError("the Events stream of the bench delivers nothing")

    async def close(self) -> None:
        if self.events is not None:
            await self.events.close()
        if self.sync_channel is not None:
            self.sync_channel.close()
        if self.process is not None:
            await self.terminate(60)
        kill_leftovers(self.tmp)


def kill_leftovers(tmp: Path) -> None:
    """QEMUs whose command line names this daemon's folder (only if the daemon died)."""
    marker = str(tmp)
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in arg for arg in process.info["cmdline"] or ()):
                process.kill()
