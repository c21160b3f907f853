"""The vsock agent channel (the original's): the manifest goes to the agent once the guest
listens, with back-off, and the Run gives up at once when QEMU dies. This host has no
vhost-vsock, so the agent's vsock port is stood in by a UNIX socket per guest CID."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.agent.vsock import Connect
from tests.support.harness import run_request, running_manager
from tests.support.waiting import wait_for


def unix_connector(root: Path, attempts: list[int] | None = None) -> Callable[[int], Connect]:
    """The agent of guest CID n listens on root/agent-n.sock; each attempt's CID goes into
    `attempts` so a test can wait for the manager to be retrying."""

    def for_cid(cid: int) -> Connect:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if attempts is not None:
                attempts.append(cid)
            return await asyncio.open_unix_connection(str(root / f"agent-{cid}.sock"))

        return connect

    return for_cid


async def test_manifest_reaches_the_agent_after_it_starts_listening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.read())
        writer.close()

    attempts: list[int] = []
    async with running_manager(tmp_path, monkeypatch,
                               agent_connector=unix_connector(tmp_path, attempts),
                               MANAGER_QEMU_AGENT_CHANNEL="vsock") as m:  # fmt: skip
        request = run_request("vs")
        run = asyncio.ensure_future(m.stub.Run(request))
        # The guest "boots": the manager is refused, and retries.
        await wait_for(lambda: len(attempts) >= 3, "the hand-over to be retried")
        assert not run.done()
        server = await asyncio.start_unix_server(agent, str(tmp_path / "agent-3.sock"))
        async with server:
            response = await asyncio.wait_for(run, 10)
            assert await asyncio.wait_for(received, 5) == manifest_json(request)
        assert json.loads(manifest_json(request))["agent_config"]["attested_tls"] is True
        process = m.service.computations()["vs"].process
        assert process is not None
        assert "vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=3" in process.argv
        assert "-fw_cfg" not in process.argv
        assert response.computation_id == "vs"


async def test_run_gives_up_at_once_when_qemu_dies_before_the_handover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, agent_connector=unix_connector(tmp_path),
                               MANAGER_QEMU_AGENT_CHANNEL="vsock",
                               MANAGER_QEMU_START_TIMEOUT="10m") as m:  # fmt: skip
        monkeypatch.setenv("FAKE_QEMU_MODE", "exit-after:0.3:1")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await m.stub.Run(run_request("dies"), timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "QEMU exited before the agent took the manifest" in (info.value.details() or "")
        assert "exit status 1" in (info.value.details() or "")
        assert m.service.computations() == {}
        assert not list((tmp_path / "vms").iterdir())
