"""One daemon per MANAGER_STATE_DIR: a second one exits at once naming the directory and the
holder's PID, and nothing of the first one is touched."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cocos_manager.host.processes import process_identity
from cocos_manager.host.state_lock import LOCK_NAME, StateDirLockedError, StateLock
from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.records import newest_records


def test_a_second_lock_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with StateLock(state) as first:
        assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateDirLockedError) as info:
            StateLock(state).acquire()
        message = str(info.value)
        assert str(state) in message and f"PID {os.getpid()}" in message
        assert message.startswith("MANAGER_STATE_DIR: ")
        assert first.held
    assert not first.held
    with StateLock(state):  # released: the next one gets it
        pass


def test_the_lock_is_not_inherited_by_children(tmp_path: Path) -> None:
    """Close-on-exec: a QEMU left running by a dead daemon must not keep the lock."""
    with StateLock(tmp_path / "state") as lock:
        assert lock._fd is not None
        assert os.get_inheritable(lock._fd) is False


@pytest.fixture
async def first(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "first.log")
    await d.start()
    yield d
    if d.process is not None and d.process.poll() is None:
        await d.terminate()


async def test_a_second_daemon_exits_and_leaves_the_first_alone(
    first: Daemon, tmp_path: Path
) -> None:
    await first.stub.Run(run_request("mine"))
    records = newest_records(tmp_path / "state")
    files = sorted(os.listdir(tmp_path / "vms"))
    assert len(records) == 1 and files
    assert first.process is not None
    qemu_pids = [child.pid for child in first.vm_children()]
    assert len(qemu_pids) == 1

    second = Daemon(env=base_env(tmp_path), log=tmp_path / "second.log")
    with pytest.raises(RuntimeError, match=r"daemon exited with \d+ at start"):
        await second.start(timeout=30)
    assert second.process is not None and second.process.returncode != 0
    await second.close_channel()
    output = (tmp_path / "second.log").read_text()
    assert re.search(
        rf"MANAGER_STATE_DIR: '{re.escape(str(tmp_path / 'state'))}' is in use by another "
        rf"cocos-manager \(PID {first.process.pid}\)",
        output,
    ), output

    # Nothing of the first was touched: its VM, record and files are there, and Stop works.
    assert process_identity(qemu_pids[0]) is not None
    assert newest_records(tmp_path / "state") == records
    assert sorted(os.listdir(tmp_path / "vms")) == files
    await first.stub.Stop(pb.StopRequest(computation_id="mine"))
    assert process_identity(qemu_pids[0]) is None or _state(qemu_pids[0]) == "Z"
    assert first.process.poll() is None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0].decode()
