"""A VM record that is lost (set aside as `.bad`, emptied by a power cut, deleted) never
orphans its QEMU or its files: the next start finds them by the VM's UUID in their names and
command line, ends the QEMU with an error line naming it, and removes the files. Not when
another daemon shares MANAGER_QEMU_TMP_FILE_LOC: its VMs have no record here."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.records import newest_record_path, newest_record_paths, newest_records
from tests.vm.test_readoption import listed, log_lines
from tests.vm.test_restart import alive, pid_of, vm_files, wait_until_gone


async def test_a_qemu_whose_record_is_lost_is_ended_and_its_files_removed(
    tmp_path: Path,
) -> None:
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    try:
        await d.stub.Run(run_request("lost"))
        await d.stub.Run(run_request("kept"))
        lost, kept = pid_of(tmp_path, "lost"), pid_of(tmp_path, "kept")
        await d.kill()
        (lost_uuid,) = [
            u
            for u, p in newest_record_paths(tmp_path / "state").items()
            if '"lost"' in p.read_text()
        ]
        for path in (tmp_path / "state").glob(f"vm-{lost_uuid}.*.json"):
            path.write_bytes(b"")  # what a power cut leaves of a record never fsynced
        await d.start()
        await wait_until_gone(lost)
        assert alive(kept) and await listed(d) == ["kept"]
        assert len(vm_files(tmp_path)) == 6 and all(lost_uuid not in n for n in vm_files(tmp_path))
        (line,) = [
            r for r in log_lines(d) if "QEMU of a lost VM record ended" in str(r.get("message"))
        ]
        assert line["level"] == "error" and line["pid"] == lost and line["uuid"] == lost_uuid
        assert list((tmp_path / "state").glob(f"vm-{lost_uuid}.*.bad"))  # kept for a look
        await d.stub.Stop(pb.StopRequest(computation_id="kept"))
        assert vm_files(tmp_path) == []
    finally:
        await d.terminate()


async def test_files_of_a_lost_record_without_a_qemu_are_removed(tmp_path: Path) -> None:
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    try:
        await d.stub.Run(run_request("gone"))
        pid = pid_of(tmp_path, "gone")
        await d.kill()
        os.kill(pid, signal.SIGKILL)
        await wait_until_gone(pid)
        for path in (tmp_path / "state").glob("vm-*.json"):
            path.unlink()
        stranger = tmp_path / "vms" / "not-a-vm-file.txt"
        stranger.write_text("the operator's")
        await d.start()
        assert vm_files(tmp_path) == ["not-a-vm-file.txt"]
    finally:
        await d.terminate()


async def test_a_daemon_sharing_tmp_file_loc_leaves_the_other_daemons_vms(
    tmp_path: Path,
) -> None:
    """Two daemons, two state directories, one TMP_FILE_LOC: neither sweeps, whichever
    started first and however often either restarts."""
    first = Daemon(env=base_env(tmp_path), log=tmp_path / "first.log")
    env = {**base_env(tmp_path), "MANAGER_STATE_DIR": str(tmp_path / "state-2")}
    env["MANAGER_QEMU_VSOCK_VNC"] = str(int(env["MANAGER_QEMU_VSOCK_VNC"]) + 20)
    second = Daemon(env=env, log=tmp_path / "second.log")
    pids: list[int] = []
    await first.start()
    try:
        await first.stub.Run(run_request("first's"))
        pids.append(pid_of(tmp_path, "first's"))
        await second.start()
        await second.stub.Run(run_request("second's"))
        pids.append(next(int(str(r["pid"])) for r in newest_records(tmp_path / "state-2")))
        warned = [r for r in log_lines(second) if "held by another" in str(r.get("message"))]
        assert warned and warned[0]["level"] == "warn"
        await first.kill()  # the first restarts while the second runs: no sweep either
        await first.start()
        assert all(alive(pid) for pid in pids) and len(vm_files(tmp_path)) == 12
        assert await listed(first) == ["first's"]
        await first.stub.Stop(pb.StopRequest(computation_id="first's"))
        await second.stub.Stop(pb.StopRequest(computation_id="second's"))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await second.terminate()
        await first.terminate()


async def test_a_qemu_of_a_record_cleaned_as_gone_is_ended_too(tmp_path: Path) -> None:
    """The record's PID is gone (as a sudo that died under its QEMU would be), but a QEMU
    naming the VM's files lives on: the record is cleaned, and that QEMU is no VM's now."""
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    try:
        await d.stub.Run(run_request("wrapped"))
        pid = pid_of(tmp_path, "wrapped")
        await d.kill()
        gone = subprocess.Popen(["true"])  # noqa: ASYNC220
        gone.wait()
        path = newest_record_path(tmp_path / "state")
        doc = json.loads(path.read_text())
        doc["pid"] = gone.pid
        path.write_text(json.dumps(doc))
        await d.start()
        await wait_until_gone(pid)
        assert await listed(d) == [] and vm_files(tmp_path) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await d.terminate()


async def test_a_lost_record_after_a_change_of_tmp_file_loc_still_ends_its_qemu(
    tmp_path: Path,
) -> None:
    """The sweep looked only in the current MANAGER_QEMU_TMP_FILE_LOC: a VM launched before
    the setting changed, whose record was then lost, ran on, nobody's. The daemon lists every
    directory it launched VMs in (MANAGER_STATE_DIR/launch-dirs) and sweeps the former
    ones too; a process naming such files in a directory it never used is left alone."""
    state, old, new = tmp_path / "state", tmp_path / "vms", tmp_path / "vms-2"
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    stranger_uuid = "0b7e5a3c-2f4d-4e8a-9c1b-7d6e5f4a3b2c"
    stranger = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(120)",
        f"{elsewhere}/bzImage-{stranger_uuid}", f"{elsewhere}/rootfs.cpio-{stranger_uuid}.gz",
    )  # fmt: skip
    try:
        await d.stub.Run(run_request("lost"))
        lost = pid_of(tmp_path, "lost")
        await d.kill()
        (lost_uuid,) = newest_record_paths(state)
        for path in state.glob("vm-*.json"):
            path.write_bytes(b"")  # what a power cut leaves of a record never fsynced
        d.env["MANAGER_QEMU_TMP_FILE_LOC"] = str(new)
        await d.start()
        await wait_until_gone(lost)
        assert os.listdir(old) == []
        (line,) = [
            r for r in log_lines(d) if "QEMU of a lost VM record ended" in str(r.get("message"))
        ]
        assert line["pid"] == lost and line["uuid"] == lost_uuid
        # Swept whole and named by no record: looked for no more.
        assert json.loads((state / "launch-dirs").read_text()) == [str(new)]
        assert stranger.returncode is None, "a process the daemon never launched was ended"
    finally:
        stranger.kill()
        await stranger.wait()
        await d.terminate()


async def test_a_former_tmp_file_loc_another_process_holds_is_not_swept(tmp_path: Path) -> None:
    """Another daemon may use the directory now (it holds a shared flock on it for its life):
    its VMs have no record here, so nothing there is touched, and it stays listed."""
    state, old, new = tmp_path / "state", tmp_path / "vms", tmp_path / "vms-2"
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    try:
        await d.stub.Run(run_request("theirs"))
        pid = pid_of(tmp_path, "theirs")
        await d.kill()
        for path in state.glob("vm-*.json"):
            path.write_bytes(b"")
        d.env["MANAGER_QEMU_TMP_FILE_LOC"] = str(new)
        held = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(held, fcntl.LOCK_SH)
            await d.start()
            assert alive(pid) and len(os.listdir(old)) > 1
            assert json.loads((state / "launch-dirs").read_text()) == [str(new), str(old)]
            assert [r for r in log_lines(d) if "not swept" in str(r.get("message"))]
        finally:
            os.close(held)
        await d.terminate()
        await d.start()  # let go of: swept now
        await wait_until_gone(pid)
    finally:
        await d.terminate()
