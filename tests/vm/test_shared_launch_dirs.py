"""Two daemons with separate state directories that have both launched VMs in one directory:
while one is down (a restart, its VMs left running), the other, starting, finds no flock on
the directory, but the directory says another state directory launched VMs there, so the
other's live QEMU is not taken for a lost record's (ended, its files removed). Whether the
directory is the starting daemon's current MANAGER_QEMU_TMP_FILE_LOC or a former one. And a
former directory is swept only if it is as the daemon made it (its own, mode 0700)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cocos_manager.host import load_launch_dirs, save_launch_dirs
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm import orphans
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.records import newest_records
from tests.vm.test_readoption import listed, log_lines
from tests.vm.test_restart import alive


async def _other_daemons_vm_while_it_is_down(
    tmp_path: Path, b_now_on: Path, *, state_unseen: bool = False
) -> None:
    shared = tmp_path / "vms"
    b = Daemon(env=base_env(tmp_path), log=tmp_path / "b.log")
    env_a = {
        **base_env(tmp_path),
        "MANAGER_STATE_DIR": str(tmp_path / "state-a"),
        "MANAGER_SHUTDOWN_STOPS_VMS": "false",
    }
    env_a["MANAGER_QEMU_VSOCK_VNC"] = str(int(env_a["MANAGER_QEMU_VSOCK_VNC"]) + 20)
    a = Daemon(env=env_a, log=tmp_path / "a.log")
    pid = 0
    try:
        await b.start()  # B launches a VM in the shared directory once
        await b.stub.Run(run_request("b's"))
        await b.stub.Stop(pb.StopRequest(computation_id="b's"))
        await b.terminate()
        await a.start()
        await a.stub.Run(run_request("a's"))
        (record,) = newest_records(tmp_path / "state-a")
        pid = int(str(record["pid"]))
        files = sorted(os.listdir(shared))
        await a.terminate()  # a restart: its VM left running
        assert alive(pid)
        b.env["MANAGER_QEMU_TMP_FILE_LOC"] = str(b_now_on)
        state_a = tmp_path / "state-a"
        if state_unseen:  # A's state directory on a file system not mounted now
            state_a.rename(tmp_path / "state-a.away")
        await b.start()  # while A is down
        if state_unseen:
            (tmp_path / "state-a.away").rename(state_a)
        assert alive(pid), "the other daemon's live VM was ended as a lost record's"
        assert sorted(os.listdir(shared)) == files
        (warned,) = [r for r in log_lines(b) if "not swept" in str(r.get("message"))]
        assert warned["level"] == "warn" and warned["launch_dir"] == str(shared)
        (other,) = warned["other_state_dirs"]
        if state_unseen:
            assert other.startswith(f"{state_a} (not found; if it is gone for good: setfattr")
        else:
            assert other == str(state_a)
        await a.start()
        assert await listed(a) == ["a's"]
        await a.stub.Stop(pb.StopRequest(computation_id="a's"))
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await b.terminate()
        await a.terminate()


async def test_a_former_launch_dir_another_daemon_uses_is_not_swept_while_it_is_down(
    tmp_path: Path,
) -> None:
    await _other_daemons_vm_while_it_is_down(tmp_path, tmp_path / "vms-2")


async def test_a_shared_tmp_file_loc_is_not_swept_while_the_other_daemon_is_down(
    tmp_path: Path,
) -> None:
    await _other_daemons_vm_while_it_is_down(tmp_path, tmp_path / "vms")


async def test_a_launch_dir_of_a_state_dir_not_found_now_is_not_swept(tmp_path: Path) -> None:
    """A state directory named on the launch directory but not found (its file system not
    mounted at that moment, another mount namespace) may have a daemon whose VMs run on."""
    await _other_daemons_vm_while_it_is_down(tmp_path, tmp_path / "vms", state_unseen=True)


async def test_a_former_launch_dir_not_as_the_daemon_made_it_is_never_swept(
    tmp_path: Path,
) -> None:
    """A listed directory not the daemon's own mode-0700 one (`/`, `/etc`, one made 0755) is
    left whole and kept listed with an error line; one that can never qualify (a symlink,
    a relative path, a file) is dropped from the list with one."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    lost = str(uuid.uuid4())
    open_dir, real = tmp_path / "open", tmp_path / "real"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "file").write_text("")
    for where in (open_dir, real):
        (where / f"console-{lost}.log").write_text("x")
    listed_dirs = [str(open_dir), str(tmp_path / "link"), "relative/dir", str(tmp_path / "file")]
    (state / "launch-dirs").write_text(json.dumps(listed_dirs))
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    try:
        await d.start()
        assert (open_dir / f"console-{lost}.log").exists()
        assert (real / f"console-{lost}.log").exists()
        assert json.loads((state / "launch-dirs").read_text()) == [
            str(tmp_path / "vms"),
            str(open_dir),
        ]
        errors = [r for r in log_lines(d) if "not swept" in str(r.get("message"))]
        assert [r["launch_dir"] for r in errors] == listed_dirs
        assert all(r["level"] == "error" for r in errors)
        assert ["dropped from the list" in str(r["message"]) for r in errors] == [
            False,
            True,
            True,
            True,
        ]
    finally:
        await d.terminate()


async def test_without_extended_attributes_only_former_launch_dirs_are_left_unswept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a directory cannot say which state directories launched VMs in it (ENOTSUP):
    the current one is swept as before (the flock decides), a former one is not (another
    daemon's VMs may be there), with one warning naming them."""

    def unsupported(*_: object) -> None:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    monkeypatch.setattr(orphans, "launch_dir_sharers", unsupported)
    monkeypatch.setattr(orphans, "mark_launch_dir", unsupported)
    state, current, former, former_2 = (tmp_path / n for n in ("state", "vms", "old", "old-2"))
    lost = str(uuid.uuid4())
    for where in (state, current, former, former_2):
        where.mkdir(mode=0o700)
        (where / f"console-{lost}.log").write_text("x")
    save_launch_dirs(state, [str(current), str(former), str(former_2)])
    with capture_logs() as logs:
        await orphans.sweep_current(state, current, set())
        await orphans.sweep_former(state, str(current), set(), set())
    assert not (current / f"console-{lost}.log").exists()
    assert (former / f"console-{lost}.log").exists()
    assert (former_2 / f"console-{lost}.log").exists()
    assert load_launch_dirs(state) == [str(current), str(former), str(former_2)]
    (warned,) = [r for r in logs if "no extended attributes" in str(r["event"])]
    assert warned["launch_dirs"] == [str(former), str(former_2)]
