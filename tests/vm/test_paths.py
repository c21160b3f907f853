"""Relative MANAGER_STATE_DIR and MANAGER_QEMU_TMP_FILE_LOC are resolved once at start: the
VM's command line and records name absolute paths, so a daemon restarted from another working
directory (with the same directories) re-adopts its VMs and cleans up their files."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.records import newest_records


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return [arg.decode() for arg in file.read().split(b"\0") if arg]


async def test_a_restart_from_another_directory_finds_its_vms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_cwd, second_cwd = tmp_path / "a", tmp_path / "b"
    first_cwd.mkdir()
    second_cwd.mkdir()
    env = base_env(tmp_path)
    env["MANAGER_STATE_DIR"] = "state"
    env["MANAGER_QEMU_TMP_FILE_LOC"] = "vms"
    monkeypatch.chdir(first_cwd)
    daemon = Daemon(env=env, log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("keep"))
        state, vms = first_cwd / "state", first_cwd / "vms"
        (record,) = newest_records(state)
        pid = int(record["pid"])
        paths = [arg for arg in cmdline(pid) if "vms" in arg]
        assert paths and all(str(vms) in arg for arg in paths), paths
        (locked,) = [
            line
            for line in (tmp_path / "daemon.log").read_text().splitlines()
            if "state directory locked" in line
        ]
        assert str(state) in locked and str(vms) in locked  # logged, resolved
        await daemon.kill()

        # The same directories, named absolutely, from another working directory.
        monkeypatch.chdir(second_cwd)
        daemon.env = {**env, "MANAGER_STATE_DIR": str(state), "MANAGER_QEMU_TMP_FILE_LOC": str(vms)}
        await daemon.start()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await daemon.stub.Run(run_request("keep"))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS  # re-adopted
        assert os.listdir(vms)
        await daemon.stub.Stop(pb.StopRequest(computation_id="keep"))
        assert os.listdir(vms) == [] and list(state.glob("vm-*.json")) == []
        assert not (second_cwd / "vms").exists() and not (second_cwd / "state").exists()
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()
