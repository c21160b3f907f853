"""The real `cocos-manager` daemon as a subprocess, for tests that kill and restart it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cocos_manager.api import manager_pb2_grpc as pb_grpc

EXE = str(Path(sys.executable).with_name("cocos-manager"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Daemon:
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> pb_grpc.ManagerServiceStub:
        assert self.channel is not None
        return pb_grpc.ManagerServiceStub(self.channel)

    async def start(self, timeout: float = 20.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
        env.update(self.env)
        env["MANAGER_GRPC_HOST"] = "127.0.0.1"
        env["MANAGER_GRPC_PORT"] = str(self.port)
        env.setdefault("COCOS_JAEGER_URL", "http://127.0.0.1:9/api/traces")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220
                [EXE], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited at start: {self.log.read_text()[-2000:]}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("daemon did not become SERVING")
            await asyncio.sleep(0.05)

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

    async def terminate(self, timeout: float = 30.0) -> int:
        await self.close_channel()
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)
