"""A VM record survives a power cut at any instant (docs/decisions.md, "Restarts: records
survive a power cut").

No power is cut here: the real daemon runs under strace, and the order of its system calls is
checked against what a power cut could undo. Data and directory entries not yet fsynced may
be lost, so a power cut at instant t leaves (at worst) the versions fsynced, in a directory
fsynced after their creation, before t. Required: a version is unlinked only once a newer one
of the same record is so durable (or the record is being removed for good), and no per-VM
file is made before the VM's record is written, nor unlinked after its last version is (a
restart finds what is left by the record). (Files made in the moment before the first
version is durable, which a Run does not wait for, are found by the next start's sweep:
tests/vm/test_lost_records.py.)
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.support.daemon_process import (
    EXE,
    Launched,
    clean_environ,
    free_port,
    serve_on_a_port,
)
from tests.support.harness import base_env, run_request

SYSCALLS = "openat,link,linkat,fsync,fdatasync,unlink,unlinkat"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclass(frozen=True)
class Call:
    time: float  # when it returned
    name: str
    path: str
    flags: str = ""


def calls(trace: Path) -> Iterator[Call]:
    """The successful calls of a `strace -f -y -ttt` trace, a call split across two lines
    (another thread's call in between) joined, timed by its return."""
    partial: dict[str, str] = {}
    for line in trace.read_text().splitlines():
        fields = re.match(r"(\d+)\s+([\d.]+) (.*)", line)
        if fields is None:  # "+++ exited with 0 +++" and the like
            continue
        pid, stamp, text = fields.groups()
        if text.endswith("<unfinished ...>"):
            partial[pid] = text.removesuffix("<unfinished ...>")
            continue
        if resumed := re.match(r"<\.\.\. \w+ resumed>(.*)", text):
            text = partial.pop(pid, "") + resumed.group(1)
        if not re.search(r"\) = \d+", text):
            continue
        name = text.split("(", 1)[0]
        if name in ("fsync", "fdatasync"):
            (path,) = re.findall(r"\(\d+<([^>]*)>", text)
            yield Call(float(stamp), name, path)
        elif name in ("openat", "unlink", "unlinkat", "link", "linkat"):
            quoted = re.findall(r'"([^"]*)"', text)
            flags = text.split('", ', 1)[1] if name == "openat" else ""
            yield Call(float(stamp), name, quoted[-1], flags)


def check_trace(trace: Path, state: Path, vms: Path) -> list[str]:
    """What a power cut at some instant of this trace would have lost."""
    problems = []
    created: dict[str, float] = {}  # record version path -> when created
    file_synced: dict[str, float] = {}  # record version path -> when fsynced
    durable: dict[str, float] = {}  # record version path -> when durable (file and entry)
    unlinked: set[str] = set()
    events = list(calls(trace))
    for call in events:
        version = re.fullmatch(rf"{re.escape(str(state))}/vm-({UUID})\.(\d+)\.json", call.path)
        in_vms = re.fullmatch(rf"{re.escape(str(vms))}/.*({UUID}).*", call.path)
        if version and call.name == "openat" and "O_CREAT" in call.flags:
            created[call.path] = call.time
        elif version and call.name in ("fsync", "fdatasync"):
            file_synced[call.path] = call.time
        elif call.path == str(state) and call.name in ("fsync", "fdatasync"):
            for path in file_synced:
                if path not in durable and created[path] < call.time:
                    durable[path] = call.time
        elif version and call.name in ("unlink", "unlinkat"):
            vm_uuid, generation = version.group(1), int(version.group(2))
            kept = [
                path
                for path in durable
                if f"vm-{vm_uuid}." in path
                and int(path.rsplit(".", 2)[1]) > generation
                and path not in unlinked
            ]
            removal = not any(  # for good: no version of the record is written after it
                f"vm-{vm_uuid}." in e.path and e.time > call.time and "O_CREAT" in e.flags
                for e in events
            )
            if not kept and not removal:
                problems.append(f"{call.path} unlinked with no newer version on the disk")
            unlinked.add(call.path)
        elif in_vms and (
            (call.name == "openat" and "O_CREAT" in call.flags) or call.name.startswith("link")
        ):
            vm_uuid = in_vms.group(1)
            if not any(f"vm-{vm_uuid}." in path for path in created):
                problems.append(f"{call.path} made before any version of its record")
        elif in_vms and call.name in ("unlink", "unlinkat"):
            vm_uuid = in_vms.group(1)
            versions = [path for path in created if f"vm-{vm_uuid}." in path]
            if versions and all(path in unlinked for path in versions):
                problems.append(f"{call.path} unlinked after its record: a restart in between")
    assert created and any("O_CREAT" in e.flags for e in events if str(vms) in e.path)
    return problems


class TracedDaemon:
    def __init__(self, tmp: Path, env: dict[str, str], name: str) -> None:
        self.env, self.log = env, tmp / f"{name}.log"
        self.trace = tmp / f"{name}.trace"

    def _launch(self, port: int) -> Launched:
        full = clean_environ() | self.env | {"MANAGER_GRPC_PORT": str(port)}
        full["COCOS_JAEGER_URL"] = "http://127.0.0.1:9/api/traces"
        command = ["strace", "-f", "-b", "execve", "-y", "-ttt", "-qq", "-e", f"trace={SYSCALLS}"]
        with open(self.log, "wb") as log:  # a port taken first: a new log and a new trace
            self.strace = subprocess.Popen(
                [*command, "-o", str(self.trace), EXE],
                env=full,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Launched(self.strace, time.perf_counter())

    async def serving(self) -> pb_grpc.ManagerServiceStub:
        self.port, _, _ = await serve_on_a_port(free_port(), self._launch, 120, self.log)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return pb_grpc.ManagerServiceStub(self.channel)

    async def terminate(self) -> None:
        await self.channel.close()
        for daemon in psutil.Process(self.strace.pid).children():
            daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(self.strace.wait, 60) == 0


async def test_a_record_is_never_without_a_version_on_the_disk(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    state, vms = tmp_path / "state", tmp_path / "vms"
    first = TracedDaemon(tmp_path, env, "first")
    stub = await first.serving()
    await asyncio.gather(*(stub.Run(run_request(f"vm-{i}")) for i in range(3)))
    await stub.Stop(pb.StopRequest(computation_id="vm-0"))
    await first.terminate()  # vm-1 and vm-2 left running
    second = TracedDaemon(tmp_path, env, "second")
    stub = await second.serving()  # adopted: a new version of each record
    listed = await stub.List(pb.ListRequest())
    assert [info.computation_id for info in listed.computations] == ["vm-1", "vm-2"]
    await stub.Run(run_request("vm-3"))
    for computation_id in ("vm-1", "vm-2", "vm-3"):
        await stub.Stop(pb.StopRequest(computation_id=computation_id))
    await second.terminate()
    problems = check_trace(first.trace, state, vms) + check_trace(second.trace, state, vms)
    assert problems == []
