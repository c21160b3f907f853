"""A real VM whose per-VM files live in a directory with a comma and a space in its name
(MANAGER_QEMU_TMP_FILE_LOC): every path QEMU gets inside an option list (`-drive ...,file=`,
`-fw_cfg ...,file=`) must double its commas (found in review: the OVMF_VARS drive did not, so
QEMU failed to open '/…/vms' and every Run failed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from cocos_manager.api import manager_pb2 as pb
from cocos_manager.api import manager_pb2_grpc as pb_grpc
from cocos_manager.manifest import manifest_json
from tests.e2e.test_readme_tcg import readme_env, start
from tests.e2e.test_real_vm import BOOT_TIMEOUT, read_agent, stop_daemon
from tests.support.harness import run_request

pytestmark = pytest.mark.timeout(300)


async def test_a_vm_runs_with_its_files_under_a_comma(tmp_path: Path) -> None:
    env = readme_env(tmp_path)
    env["MANAGER_QEMU_TMP_FILE_LOC"] = str(tmp_path / "vms, 1")
    daemon = await asyncio.to_thread(start, env, tmp_path)
    try:
        request = run_request("comma")
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
