"""The README's TCG block, exactly as written, runs a real VM (a new operator on a
host without SEV, KVM or vhost-vsock gets their own daemon to run a VM from the README alone).

The block is read from README.md (the `<!-- readme-env: tcg -->` marker); the test changes only
where things are written (state, per-VM files), the listening port and the VNC display, so
that it runs beside other tests, and takes the guest from TEST_GUEST_DIR when set. Everything
that decides whether a Run works comes from the README.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import (
    BOOT_TIMEOUT,
    DAEMON_START_TIMEOUT,
    Daemon,
    daemon_executable,
    free_port,
    guest_images,
    kill,
    read_agent,
    stop_daemon,
    wait_manager_serving,
)
from tests.support import daemon_process
from tests.support.harness import run_request, vnc_display
from tests.support.readme import REPO, env_block

pytestmark = pytest.mark.timeout(300)

WHERE_ONLY = {
    "MANAGER_GRPC_PORT",
    "MANAGER_STATE_DIR",
    "MANAGER_QEMU_TMP_FILE_LOC",
    "MANAGER_QEMU_VSOCK_VNC",
    "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
    "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
}


def readme_env(root: Path) -> dict[str, str]:
    block = env_block("tcg")
    # The README's images are the test guest that `make guest` builds.
    assert block["MANAGER_QEMU_DISK_IMG_KERNEL_FILE"] == str(REPO / "build/guest/bzImage")
    assert block["MANAGER_QEMU_DISK_IMG_ROOTFS_FILE"] == str(REPO / "build/guest/rootfs.cpio.gz")
    kernel, rootfs = guest_images()
    overrides = {
        "MANAGER_GRPC_PORT": str(free_port()),
        "MANAGER_STATE_DIR": str(root / "state"),
        "MANAGER_QEMU_TMP_FILE_LOC": str(root / "vms"),
        "MANAGER_QEMU_VSOCK_VNC": str(vnc_display(90)),
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": str(kernel),
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": str(rootfs),
    }
    assert set(overrides) <= WHERE_ONLY
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
    return {**base, **block, **overrides}


def check_host(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(daemon_executable()), "check"], env=env, capture_output=True, text=True, timeout=60
    )


def start(env: dict[str, str], root: Path) -> Daemon:
    """The real daemon with exactly the README's settings (plus where its files go)."""
    daemon = Daemon.__new__(Daemon)
    daemon_process.Daemon.__init__(
        daemon, env=env, log=root / "daemon.log", port=int(env["MANAGER_GRPC_PORT"]), cwd=root
    )
    daemon.vm_dir = Path(env["MANAGER_QEMU_TMP_FILE_LOC"])
    try:
        asyncio.run(daemon.start(DAEMON_START_TIMEOUT, connect=False))
        wait_manager_serving(daemon)
    except BaseException:
        kill(daemon)
        raise
    return daemon


async def run_one_vm(env: dict[str, str], root: Path, computation_id: str) -> Daemon:
    """The real daemon with `env`: one Run whose forwarded port serves exactly its manifest,
    Stop, no per-VM file left, the daemon stopped cleanly. Returns it, for its log."""
    daemon = await asyncio.to_thread(start, env, root)
    try:
        request = run_request(computation_id)
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            response = await stub.Run(request, timeout=BOOT_TIMEOUT)
            try:
                assert await read_agent(int(response.agent_port)) == manifest_json(request)
            finally:
                await stub.Stop(pb.StopRequest(computation_id=request.id), timeout=60)
        assert daemon.vm_files() == []
    finally:
        await asyncio.to_thread(stop_daemon, daemon)
    return daemon


async def test_the_readme_tcg_block_runs_a_vm(tmp_path: Path) -> None:
    env = readme_env(tmp_path)
    check = await asyncio.to_thread(check_host, env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not [line for line in check.stdout.splitlines() if line.startswith("FAIL")]

    daemon = await run_one_vm(env, tmp_path, "readme-tcg")
    # The README block leaves nothing to warn about but the host's own KVM/vsock state.
    text = daemon.log.read_text()
    assert "is not a setting of the manager" not in text
    assert "all interfaces without TLS" not in text
