"""A restart with another MANAGER_QEMU_TMP_FILE_LOC: a VM proven ours is never killed for the
setting change. Its files are found in the directory it was launched in (recorded, and
checked before use); where that directory is not one the daemon may use, the VM is kept
running without its files and Stop still ends it (docs/decisions.md, "Restarts")."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.records import newest_record_path
from tests.vm.test_readoption import listed, log_lines
from tests.vm.test_restart import alive, pid_of, records, wait_until_gone


async def launched_then_moved(tmp_path: Path) -> tuple[Daemon, int]:
    """A VM launched with TMP_FILE_LOC=vms, the daemon stopped leaving it running, and
    started again with TMP_FILE_LOC=vms-new (not started yet: the caller does)."""
    env = {**base_env(tmp_path), "MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    d = Daemon(env=env, log=tmp_path / "daemon.log")
    await d.start()
    await d.stub.Run(run_request("moved"))
    pid = pid_of(tmp_path, "moved")
    assert len(os.listdir(tmp_path / "vms")) == 6  # with the console file
    assert await d.terminate() == 0
    d.env["MANAGER_QEMU_TMP_FILE_LOC"] = str(tmp_path / "vms-new")
    return d, pid


async def test_a_vm_survives_a_change_of_tmp_file_loc_and_stop_removes_its_files(
    tmp_path: Path,
) -> None:
    d, pid = await launched_then_moved(tmp_path)
    try:
        await d.start()
        assert alive(pid), "a VM proven ours was killed for a setting change"
        assert await listed(d) == ["moved"]
        (record,) = records(tmp_path)
        assert record["tmp_dir"] == str(tmp_path / "vms")
        d.env["MANAGER_SHUTDOWN_STOPS_VMS"] = "true"
        await d.kill()  # and once more, the record written after the adoption finds it
        await d.start()
        assert await listed(d) == ["moved"]
        await d.stub.Stop(pb.StopRequest(computation_id="moved"))
        await wait_until_gone(pid)
        assert os.listdir(tmp_path / "vms") == [], "the VM's files stayed where it was launched"
        assert records(tmp_path) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await d.terminate()


@pytest.mark.parametrize("how", ["group-writable", "symlink", "edited"])
async def test_a_launch_dir_the_daemon_may_not_use_is_left_and_the_vm_kept(
    tmp_path: Path, how: str
) -> None:
    """The recorded directory is checked as every path the daemon derives: here it is
    writable by others, a symlink, or an edited record points elsewhere. Nothing there is
    touched (no socket asked, no file deleted); the VM is kept running, an error line says
    so, and Stop ends it."""
    d, pid = await launched_then_moved(tmp_path)
    launched = tmp_path / "vms"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "precious").write_text("not the daemon's")
    try:
        if how == "group-writable":
            launched.chmod(0o770)
            where = str(launched)
        elif how == "symlink":
            launched.rename(tmp_path / "vms-real")
            launched.symlink_to(tmp_path / "vms-real")
            where = str(launched)
        else:
            path = newest_record_path(tmp_path / "state")
            doc = json.loads(path.read_text())
            uuid = doc["uuid"]
            for name in os.listdir(launched):  # the attacker's copy of the names
                (other / name.replace(uuid, uuid)).write_text("not the daemon's")
            os.chmod(other, 0o777)
            doc["tmp_dir"] = where = str(other)
            path.write_text(json.dumps(doc))
        before = sorted(os.listdir(where))
        await d.start()
        assert alive(pid) and await listed(d) == ["moved"]
        (line,) = [r for r in log_lines(d) if "VM files not touched" in str(r.get("message"))]
        assert line["level"] == "error" and line["launch_dir"] == where
        d.env["MANAGER_SHUTDOWN_STOPS_VMS"] = "true"
        await d.stub.Stop(pb.StopRequest(computation_id="moved"))
        await wait_until_gone(pid)
        assert sorted(os.listdir(where)) == before, "files in an unchecked directory touched"
        assert (other / "precious").read_text() == "not the daemon's"
        assert records(tmp_path) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await d.terminate()
