"""A real manager in the test's event loop: settings from the environment, a grpc.aio server
on loopback, and a real client stub. QEMU is the stand-in unless a test says otherwise."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cocos_manager.agent.vsock import Connect
from cocos_manager.api.server import Server
from cocos_manager.config.settings import Settings, load_settings
from cocos_manager.daemon import DaemonRunner
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from cocos_manager.service import ManagerService

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")


@dataclass
class Manager:
    settings: Settings
    service: ManagerService
    server: Server
    channel: grpc.aio.Channel
    stub: pb_grpc.ManagerServiceStub
    tmp: Path
    runner: DaemonRunner

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def fake_images(root: Path) -> dict[str, str]:
    """Small files standing in for kernel, rootfs and OVMF (the stand-in only checks they exist)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for var, name, size in (
        ("MANAGER_QEMU_DISK_IMG_KERNEL_FILE", "bzImage", 4096),
        ("MANAGER_QEMU_DISK_IMG_ROOTFS_FILE", "rootfs.cpio.gz", 4096),
        ("MANAGER_QEMU_OVMF_CODE_FILE", "OVMF_CODE.fd", 1024),
        ("MANAGER_QEMU_OVMF_VARS_FILE", "OVMF_VARS.fd", 1024),
    ):
        path = root / name
        path.write_bytes(os.urandom(size))
        files[var] = str(path)
    return files


def vnc_display(first: int) -> int:
    """A VNC display base of this test worker's own: tests run in parallel (pytest-xdist, one
    process per worker), and a display one worker's VM holds would move another's VM to the
    next one (VNC binds 5900 + display on the host)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return first + 200 * int(worker or 0)


VNC_BASE = vnc_display(40)  # the stand-in QEMU's first display (base_env)


def base_env(tmp: Path) -> dict[str, str]:
    return {
        "MANAGER_QEMU_BIN_PATH": str(FAKE_QEMU),
        "MANAGER_QEMU_TMP_FILE_LOC": str(tmp / "vms"),
        "MANAGER_QEMU_ENABLE_KVM": "false",
        "MANAGER_QEMU_ENABLE_SEV_SNP": "false",
        "MANAGER_QEMU_AGENT_CHANNEL": "fw_cfg",
        "MANAGER_QEMU_STOP_TIMEOUT": "5s",
        "MANAGER_QEMU_START_TIMEOUT": "20s",
        "MANAGER_QEMU_VSOCK_VNC": str(VNC_BASE),
        "MANAGER_STATE_DIR": str(tmp / "state"),
        "MANAGER_GRPC_HOST": "127.0.0.1",
        "MANAGER_GRPC_PORT": "0",
        # QEMU gets a minimal environment: the stand-in's knobs must be passed on by name.
        "MANAGER_QEMU_PASS_ENV": "FAKE_QEMU_MODE,FAKE_QEMU_SQUAT,FAKE_QEMU_START_LOG,"
        "FAKE_QEMU_TAKEN_CIDS,FAKE_QEMU_TICK,FAKE_QEMU_BURST",
        **fake_images(tmp / "img"),
    }


_TRACES = InMemorySpanExporter()
_PROVIDER: TracerProvider | None = None


def test_tracer_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """One provider for the whole session, recording spans in memory: OpenTelemetry's global
    provider can be set only once per process."""
    global _PROVIDER
    if _PROVIDER is None:
        _PROVIDER = TracerProvider(resource=Resource.create({"service.name": "manager"}))
        _PROVIDER.add_span_processor(SimpleSpanProcessor(_TRACES))
        trace.set_tracer_provider(_PROVIDER)
    return _PROVIDER, _TRACES


@asynccontextmanager
async def running_manager(
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    agent_connector: Callable[[int], Connect] | None = None,
    client_credentials: grpc.ChannelCredentials | None = None,
    dial_out: bool = True,
    **env: str,
) -> AsyncIterator[Manager]:
    """The daemon's own runner (daemon.DaemonRunner) in the test's loop: the production
    wiring, interceptors, agent listener and metrics included."""
    for name, value in {**base_env(tmp), **env}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    extra = {"agent_connector": agent_connector} if agent_connector else {}
    provider, _ = test_tracer_provider()
    runner = DaemonRunner(
        settings, shutdown_grace=1, tracer_provider=provider, dial_out=dial_out, **extra
    )
    try:
        await runner.setup()
        await runner.start()
        assert runner.service is not None and runner.server is not None
        port = runner.server.port
        channel = (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            if client_credentials is None
            else grpc.aio.secure_channel(f"localhost:{port}", client_credentials)
        )
        try:
            yield Manager(
                settings,
                runner.service,
                runner.server,
                channel,
                pb_grpc.ManagerServiceStub(channel),
                tmp,
                runner,
            )
        finally:
            await channel.close()
    finally:
        await runner.cleanup()


def run_request(
    computation_id: str, *, datasets: int = 1, description: str = ""
) -> pb.ComputationRunReq:
    return pb.ComputationRunReq(
        id=computation_id,
        name=f"name of {computation_id}",
        description=description,
        datasets=[
            pb.Dataset(provider="p", id=f"d{i}", hash=hashlib.sha3_256(b"d%d" % i).digest())
            for i in range(datasets)
        ],
        algorithm=pb.Algorithm(provider="alg-p", id="alg", hash=hashlib.sha3_256(b"alg").digest()),
        result_consumers=["consumer-1"],
        agent_config=pb.AgentConfig(
            port="7002", host="0.0.0.0", log_level="info", attested_tls=True
        ),
    )
