"""VM records are not trusted blindly: a state directory others can write is
refused, every field is checked, paths come from the UUID and the settings, a process is
signalled only with its full identity, records of another boot are cleaned without
signalling, and garbage is set aside with one log line, never a traceback or a restart loop."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cocos_manager.errors import FailedPreconditionError
from cocos_manager.host.processes import process_identity
from cocos_manager.host.state_store import (
    RECORD_STATES,
    StateStore,
    VmRecord,
    current_boot_id,
)
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm.lifecycle import VmState
from cocos_manager.vm.recovery import started_as_recorded
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request, running_manager
from tests.support.records import newest_records

DAEMON = Path(sys.executable).with_name("cocos-manager")
U = "0b7b3f0e-2f4c-4c1e-9b64-1f0a3c2d4e5f"


def good_doc(**changes: object) -> dict[str, Any]:
    record = VmRecord("c1", U, "running", 7020, 3, 0, pid=0)
    return {**json.loads(json.dumps(record.__dict__)), **changes}


def write_record(state: Path, doc: object, name: str | None = None) -> Path:
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state / (name or f"vm-{U}.1.json")
    path.write_text(json.dumps(doc))
    return path


@contextlib.contextmanager
def stranger() -> Any:
    """An unrelated live process whose PID and start time a record may name."""
    code = "import sys, time; print('ready', flush=True); sys.stdout.close(); time.sleep(300)"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()  # exec'd: its command line is final
    process.stdout.close()
    try:
        yield process
    finally:
        process.kill()
        process.wait()


# -- the directory ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722, 0o1777])
def test_state_dir_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(FailedPreconditionError) as info:
        StateStore(state).open()
    message = str(info.value)
    assert message.startswith("MANAGER_STATE_DIR: ")
    assert "writable by group or others" in message and f"chmod 700 {str(state)!r}" in message


def test_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to give the directory to another user")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(FailedPreconditionError) as info:
        StateStore(state).open()
    assert "MANAGER_STATE_DIR: " in str(info.value) and "owned by uid 65534" in str(info.value)


def test_daemon_refuses_to_start_on_a_world_writable_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANAGER_")}
    env.update(base_env(tmp_path))
    env["COCOS_JAEGER_URL"] = "http://127.0.0.1:9/api/traces"
    done = subprocess.run([str(DAEMON)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "MANAGER_STATE_DIR" in done.stderr and "chmod 700" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# -- fields ------------------------------------------------------------------------------------

NONSENSE: list[tuple[str, object]] = [
    ("not json", "{not json"),
    ("a list", [1, 2]),
    ("pid -1", good_doc(pid=-1, state="starting")),
    ("pid 1", good_doc(pid=1)),
    ("pid as text", good_doc(pid="1234")),
    ("pid too big", good_doc(pid=1 << 40)),
    ("unknown state", good_doc(state="exploded")),
    ("released", good_doc(state="released")),
    ("uuid with a path", good_doc(uuid="../../etc/passwd")),
    ("uuid not canonical", good_doc(uuid=U.upper())),
    ("port 0", good_doc(host_port=0)),
    ("port as bool", good_doc(host_port=True)),
    ("cid 2 (the host)", good_doc(guest_cid=2)),
    ("negative display", good_doc(vnc_display=-1)),
    ("relative launch directory", good_doc(tmp_dir="vms")),
    ("launch directory not text", good_doc(tmp_dir=["/vms"])),
    ("empty id", good_doc(computation_id="")),
    ("id not a string", good_doc(computation_id=7)),
    ("argv not strings", good_doc(argv=["qemu", 3])),
    ("unknown field", good_doc(evil=True)),
    ("missing field", {k: v for k, v in good_doc().items() if k != "guest_cid"}),
    ("other version", good_doc(version=99)),
    ("expires never", good_doc(expires_at="never")),
    ("deep nesting", "[" * 100000 + "]" * 100000),
    ("operator_paused as text", good_doc(operator_paused="yes")),
    ("negative vcpus", good_doc(vcpus=-1)),
    ("memory as text", good_doc(memory_mib="4G")),
    ("settings not strings", good_doc(settings={"MANAGER_QEMU_SMP_COUNT": 4})),
    ("settings a list", good_doc(settings=["a"])),
]


@pytest.mark.parametrize(("kind", "doc"), NONSENSE, ids=[kind for kind, _ in NONSENSE])
def test_nonsense_is_set_aside_with_one_log_line(tmp_path: Path, kind: str, doc: object) -> None:
    state = tmp_path / "state"
    path = write_record(state, doc)
    if isinstance(doc, str):
        path.write_text(doc)
    with capture_logs() as logs:
        assert StateStore(state).load_all() == []
    assert [e["event"] for e in logs] == ["VM record set aside: not one this daemon wrote"]
    assert not path.exists() and path.with_name(f"vm-{U}.1.bad").exists()
    with capture_logs() as again:  # set aside once: the next start does not trip on it
        assert StateStore(state).load_all() == []
    assert again == []


def test_a_good_record_loads_and_a_symlink_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_record(state, good_doc())
    (record,) = StateStore(state).load_all()
    assert record.uuid == U and record.boot_id == current_boot_id() != ""
    elsewhere = write_record(tmp_path / "other", good_doc(uuid=str(uuid.uuid4())))
    other_uuid = json.loads(elsewhere.read_text())["uuid"]
    (state / f"vm-{other_uuid}.1.json").symlink_to(elsewhere)
    with capture_logs() as logs:
        assert [r.uuid for r in StateStore(state).load_all()] == [U]
    assert len(logs) == 1 and elsewhere.exists()


def test_a_record_whose_uuid_is_not_its_file_name_is_set_aside(tmp_path: Path) -> None:
    state = tmp_path / "state"
    other = str(uuid.uuid4())
    write_record(state, good_doc(uuid=other))
    assert StateStore(state).load_all() == []
    assert (state / f"vm-{U}.1.bad").exists()


def test_record_states_are_the_machines_states() -> None:
    assert RECORD_STATES == {s.value for s in VmState} - {VmState.RELEASED.value}


def test_a_starting_process_is_identified_by_its_exec_not_its_pid() -> None:
    record = VmRecord("c", U, "starting", 1, 3, 0, argv=["/q/wrapper", "-name", f"vm-{U}"])
    assert started_as_recorded(record, record.argv)  # as exec'd (sudo keeps its argv)
    assert started_as_recorded(record, ["/bin/sh", *record.argv])  # a script's interpreter
    assert started_as_recorded(record, ["qemu-system-x86_64", "-name", f"vm-{U}"])  # exec'd on
    assert not started_as_recorded(record, ["sleep", "300"])
    assert not started_as_recorded(record, ["qemu-system-x86_64", "-name", "vm-other"])
    bare = VmRecord("c", U, "starting", 1, 3, 0, argv=["/q/wrapper", "-S"])
    assert not started_as_recorded(bare, ["x", "-S"])  # common part does not name the VM


# -- recovery, in the daemon's own runner ----------------------------------------------------------


async def test_paths_come_from_the_uuid_not_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edited record naming someone else's file: that file stays, the VM's own go."""
    victim = tmp_path / "precious"
    victim.write_text("not the daemon's")
    vms = tmp_path / "vms"
    vms.mkdir()
    own = [vms / f"bzImage-{U}", vms / f"rootfs.cpio-{U}.gz", vms / f"agent-config-{U}.json"]
    for path in own:
        path.write_text("left by a crash")
    doc = good_doc(files={"kernel": str(victim), "qmp": str(victim)})
    write_record(tmp_path / "state", doc)
    async with running_manager(tmp_path, monkeypatch) as m:
        assert m.service.computations() == {}
    assert victim.read_text() == "not the daemon's"
    assert [p for p in own if p.exists()] == []
    assert list((tmp_path / "state").glob("vm-*")) == []


@pytest.mark.parametrize("boot_id", ["0c0ffee0-0000-4000-8000-000000000000", None])
async def test_a_record_of_another_boot_is_cleaned_without_signalling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boot_id: str | None
) -> None:
    """After a reboot, PID and start time (ticks since boot) may name a new, unrelated
    process; so may a record that does not say which boot it is from."""
    with stranger() as other:
        identity = process_identity(other.pid)
        assert identity is not None
        doc = good_doc(pid=other.pid, start_time=identity[0], state="starting", argv=identity[1])
        doc["cmdline"] = identity[1]
        if boot_id is None:
            del doc["boot_id"]
        else:
            doc["boot_id"] = boot_id
        write_record(tmp_path / "state", doc)
        with capture_logs() as logs:
            async with running_manager(tmp_path, monkeypatch) as m:
                assert m.service.computations() == {}
        assert other.poll() is None, "a process of another boot's record was signalled"
        assert list((tmp_path / "state").glob("vm-*")) == []
        cleaned = [e for e in logs if e["event"].startswith("VM record cleaned up")]
        assert len(cleaned) == 1 and "another boot" in cleaned[0]["event"]


async def test_a_starting_record_needs_the_command_line_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PID and start time match a live process, but it is not what the daemon exec'd: not
    signalled (before, a starting record was identified by start time alone, and killed), and
    its record kept for the operator, whom an error line tells."""
    with stranger() as other:
        identity = process_identity(other.pid)
        assert identity is not None
        argv = [str(tmp_path / "qemu"), "-uuid", U, "-name", f"vm-{U}"]
        doc = good_doc(pid=other.pid, start_time=identity[0], state="starting", argv=argv)
        write_record(tmp_path / "state", doc)
        with capture_logs() as logs:
            async with running_manager(tmp_path, monkeypatch) as m:
                assert m.service.computations() == {}
        assert other.poll() is None, "a process not proven ours was signalled"
        assert len(list((tmp_path / "state").glob("vm-*.json"))) == 1
        (kept,) = [e for e in logs if e["event"].startswith("VM not re-adopted")]
        assert kept["log_level"] == "error" and kept["pid"] == other.pid


# -- garbage, in a real daemon ------------------------------------------------------------------


async def test_daemon_starts_with_garbage_records_and_sets_each_aside_once(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    garbage: dict[str, str] = {
        f"vm-{U}.1.json": "{not json",
        f"vm-{uuid.uuid4()}.1.json": json.dumps(good_doc(pid=-1)),
        "vm-../../etc.json": "",
        f"vm-{uuid.uuid4()}.7.json": json.dumps([]),
        f"vm-{uuid.uuid4()}.json": "\x00\xff" * 10,
        f"vm-{uuid.uuid4()}.2.json": json.dumps(good_doc(state="on fire")),
    }
    for name, text in garbage.items():
        if "/" in name:
            continue
        (state / name).write_text(text)
    (state / f"vm-{uuid.uuid4()}.1.json").mkdir()  # not even a file
    d = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log")
    await d.start()
    try:
        await d.stub.Run(run_request("after-garbage"))
        log = d.log.read_text()
        assert "Traceback" not in log
        assert log.count("VM record set aside") == 6
        assert sorted(p.suffix for p in state.glob("vm-*.bad")) == [".bad"] * 6
        assert [r["computation_id"] for r in newest_records(state)] == ["after-garbage"]
        await d.stub.Stop(pb.StopRequest(computation_id="after-garbage"))
        await d.kill()
        await d.start()  # no second round of complaints, no restart loop
        assert d.log.read_text().count("VM record set aside") == 6
    finally:
        if d.process is not None and d.process.poll() is None:
            await d.terminate()
