"""Hardening for real hosts: a guest CID another VMM holds, a
hand-over that times out, a state directory that is full, a QEMU that cannot be executed.
Each against real parts: the stand-in QEMU failing with QEMU 7.2's own words, a real tmpfs,
the daemon's own runner and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from cocos_manager.agent.vsock import Connect
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.telemetry.metrics import METRICS
from tests.support.harness import base_env, run_request, running_manager
from tests.test_faults import assert_nothing_left, listing, run_error, starts, tmpfs

DAEMON = Path(sys.executable).with_name("cocos-manager")


def unix_agents(root: Path) -> Callable[[int], Connect]:
    """The agent of guest CID n listens on root/agent-n.sock (no vhost-vsock on this host)."""

    def for_cid(cid: int) -> Connect:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(str(root / f"agent-{cid}.sock"))

        return connect

    return for_cid


@asynccontextmanager
async def agents_listening(root: Path, cids: range) -> AsyncIterator[None]:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    servers = [await asyncio.start_unix_server(agent, str(root / f"agent-{c}.sock")) for c in cids]
    try:
        yield
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


def failures(reason: str) -> float:
    return METRICS.registry.get_sample_value("manager_run_failures_total", {"reason": reason}) or 0


# -- a guest CID held by another VMM -------------------------------------------------------------


async def test_a_taken_guest_cid_is_retried_on_the_next_and_never_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "starts"
    env = {
        "MANAGER_QEMU_AGENT_CHANNEL": "vsock",
        "FAKE_QEMU_TAKEN_CIDS": "3,4",
        "FAKE_QEMU_START_LOG": str(log),
    }
    async with (
        agents_listening(tmp_path, range(3, 12)),
        running_manager(tmp_path, monkeypatch, agent_connector=unix_agents(tmp_path), **env) as m,
    ):
        await m.stub.Run(run_request("first"))
        assert [entry["cid"] for entry in starts(log)] == [3, 4, 5]
        assert m.service.computations()["first"].resources.guest_cid == 5
        assert m.service.computation_for_cid(5) == "first"
        assert m.service.computation_for_cid(3) is None
        await m.stub.Stop(pb.StopRequest(computation_id="first"))
        await m.stub.Run(run_request("second"))  # 3 and 4 are shunned: straight to 5
        await m.stub.Run(run_request("third"))
        assert [entry["cid"] for entry in starts(log)] == [3, 4, 5, 5, 6]
        for name in ("second", "third"):
            await m.stub.Stop(pb.StopRequest(computation_id=name))
        await assert_nothing_left(m)


async def test_taken_guest_cids_on_every_attempt_are_resource_exhausted_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "starts"
    env = {
        "MANAGER_QEMU_AGENT_CHANNEL": "vsock",
        "FAKE_QEMU_TAKEN_CIDS": "3,4,5,6,7",
        "FAKE_QEMU_START_LOG": str(log),
    }
    async with (
        agents_listening(tmp_path, range(3, 12)),
        running_manager(tmp_path, monkeypatch, agent_connector=unix_agents(tmp_path), **env) as m,
    ):
        before = failures("resource_exhausted")
        error = await run_error(m.stub.Run(run_request("crowded")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error.details() or ""
        assert "guest CIDs 3, 4, 5 are held by another process" in details
        assert "MANAGER_QEMU_VSOCK_GUEST_CID" in details
        assert failures("resource_exhausted") == before + 1
        await assert_nothing_left(m)
        await m.stub.Run(run_request("later"))  # the next Run goes on after the shunned ones
        assert [entry["cid"] for entry in starts(log)] == [3, 4, 5, 6, 7, 8]
        await m.stub.Stop(pb.StopRequest(computation_id="later"))
        await assert_nothing_left(m)


# -- errors that help ---------------------------------------------------------------------------


async def test_a_handover_timeout_counts_as_start_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU runs, its agent never listens: the hand-over gives up after the start timeout,
    and the failure metric says start_timeout, not qemu_exited."""
    env = {"MANAGER_QEMU_AGENT_CHANNEL": "vsock", "MANAGER_QEMU_START_TIMEOUT": "1s"}
    async with running_manager(
        tmp_path, monkeypatch, agent_connector=unix_agents(tmp_path), **env
    ) as m:
        timeouts, exits = failures("start_timeout"), failures("qemu_exited")
        error = await run_error(m.stub.Run(run_request("silent")))
        assert "agent did not accept the manifest within 1 s" in (error.details() or "")
        assert failures("start_timeout") == timeouts + 1
        assert failures("qemu_exited") == exits
        await assert_nothing_left(m)


async def test_a_full_state_dir_at_admission_is_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "starts"
    with tmpfs(tmp_path / "state", "32k") as state:  # pages for launch-dirs and record versions
        async with running_manager(tmp_path, monkeypatch, FAKE_QEMU_START_LOG=str(log)) as m:
            filler = state / "filler"
            with (  # the tmpfs to its last byte
                open(filler, "wb", buffering=0) as out,
                pytest.raises(OSError, match="No space left"),
            ):
                while True:
                    out.write(b"\0" * 4096)
            before = listing(state)  # the filler, and what the daemon keeps there at start
            error = await run_error(m.stub.Run(run_request("no-room")))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MANAGER_STATE_DIR: no space left" in (error.details() or "")
            assert starts(log) == [] and listing(state) == before and "filler" in before
            await assert_nothing_left(m)
            filler.unlink()
            await m.stub.Run(run_request("room-again"))
            await m.stub.Stop(pb.StopRequest(computation_id="room-again"))
            await assert_nothing_left(m)


def test_a_qemu_without_exec_permission_stops_start_up(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\nexit 0\n")
    qemu.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANAGER_")}
    env.update({**base_env(tmp_path), "MANAGER_QEMU_BIN_PATH": str(qemu)})
    done = subprocess.run([str(DAEMON)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "MANAGER_QEMU_BIN_PATH" in lines[0] and str(qemu) in lines[0]


@pytest.mark.parametrize("how", ["removed", "not executable", "not a program"])
async def test_a_qemu_gone_after_start_up_is_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    qemu = tmp_path / "bin" / "qemu-system-x86_64"
    qemu.parent.mkdir()
    qemu.write_text("#!/bin/sh\nexit 1\n")
    qemu.chmod(0o755)
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_BIN_PATH=str(qemu)) as m:
        if how == "removed":
            qemu.unlink()
        elif how == "not executable":
            qemu.chmod(0o644)
        else:
            qemu.write_bytes(b"\x7fELF garbage")
        error = await run_error(m.stub.Run(run_request("no-qemu")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.details() or ""
        assert details.startswith("MANAGER_QEMU_BIN_PATH: cannot execute")
        assert str(qemu) in details
        await assert_nothing_left(m)
        assert json.dumps(listing(tmp_path / "vms")) == "[]"
