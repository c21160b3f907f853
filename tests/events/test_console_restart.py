"""The console survives the daemon: no line QEMU prints is lost across a daemon SIGKILL or a
SIGTERM that leaves the VMs running (an upgrade), Logs after the restart has the lines from
before it and follows the new ones, an ended VM's console is kept for its post-mortem, and the
disk a chatty guest fills is bounded (docs/decisions.md, "The console survives the daemon").

The real daemon and real restarts, with the stand-in QEMU as the chatty guest: it prints
"tick N" every TICK seconds, and a burst of lines on SIGUSR1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.processes import console_keepers, gone_within
from tests.support.waiting import wait_for

TICK = "0.05"
WAIT = 30.0
_TICK = re.compile(r"^tick (\d+)$")


def settings(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **base_env(tmp_path),
        "MANAGER_SHUTDOWN_STOPS_VMS": "false",
        "FAKE_QEMU_TICK": TICK,
        **extra,
    }


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    """Every daemon a test starts; whatever still runs at its end is stopped with its VMs
    (they outlive a SIGTERM here: each is stopped first)."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            for vm in (await daemon.stub.List(pb.ListRequest(), timeout=5)).computations:
                await daemon.stub.Stop(pb.StopRequest(computation_id=vm.computation_id))
            await daemon.terminate()


async def start(daemons: list[Daemon], env: dict[str, str], log: Path) -> Daemon:
    daemon = Daemon(env=env, log=log)
    daemons.append(daemon)
    await daemon.start()
    return daemon


def ticks(messages: list[str]) -> list[int]:
    return [int(m.group(1)) for line in messages if (m := _TICK.match(line))]


async def logs(stub: pb_grpc.ManagerServiceStub, computation_id: str) -> list[str]:
    stream = stub.Logs(pb.LogsRequest(computation_id=computation_id), timeout=10)
    return [line.message async for line in stream]


async def follow_until(
    stub: pb_grpc.ManagerServiceStub,
    computation_id: str,
    done: Callable[[list[str]], bool],
    what: str,
) -> list[str]:
    """Logs with follow: every line until `done` holds of them all (the history included)."""
    seen: list[str] = []
    stream = stub.Logs(pb.LogsRequest(computation_id=computation_id, follow=True))

    async def read() -> None:
        async for line in stream:
            seen.append(line.message)
            if done(seen):
                return
        raise AssertionError(f"Logs ended before {what}: {seen[-5:]}")

    try:
        await asyncio.wait_for(read(), WAIT)
    except TimeoutError:
        raise AssertionError(f"Logs never showed {what}; it had {seen[-5:]}") from None
    finally:
        stream.cancel()
    return seen


async def restart(daemon: Daemon, kind: str) -> None:
    if kind == "sigkill":
        await daemon.kill()
    else:
        assert await daemon.terminate() == 0
    await daemon.start()


def qemu_pid(daemon: Daemon) -> int:
    (vm,) = daemon.vm_children()
    return vm.pid


def console_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "vms").glob("console-*"))


def console_bytes(tmp_path: Path) -> list[bytes]:
    """Each console file's bytes; a file the keeper renames (its rotation) between the
    listing and the read is left out: it is read again on the next look."""
    found = []
    for path in console_files(tmp_path):
        with contextlib.suppress(FileNotFoundError):
            found.append(path.read_bytes())
    return found


@pytest.mark.parametrize("kind", ["sigkill", "sigterm"])
async def test_no_console_line_is_lost_across_a_restart_and_logs_follows_on(
    tmp_path: Path, daemons: list[Daemon], kind: str
) -> None:
    daemon = await start(daemons, settings(tmp_path), tmp_path / "daemon.log")
    await daemon.stub.Run(run_request("chatty"), timeout=WAIT)
    before = await follow_until(
        daemon.stub, "chatty", lambda seen: len(ticks(seen)) >= 5, "five ticks"
    )
    await restart(daemon, kind)

    history = await logs(daemon.stub, "chatty")
    assert "BOOTED chatty" in history, f"Logs after the restart lost the lines before: {history}"
    assert ticks(history)[: len(ticks(before))] == ticks(before)
    at_restart = max(ticks(history))
    seen = await follow_until(
        daemon.stub,
        "chatty",
        lambda seen: max(ticks(seen), default=-1) >= at_restart + 10,
        "ticks printed after the restart",
    )
    numbers = ticks(seen)
    assert numbers == list(range(numbers[-1] + 1)), "a console line was lost or repeated"
    assert seen[0] == "BOOTED chatty"


async def test_the_post_mortem_of_a_vm_that_ran_across_a_restart_has_all_of_its_console(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await start(daemons, settings(tmp_path), tmp_path / "daemon.log")
    await daemon.stub.Run(run_request("across"), timeout=WAIT)
    await follow_until(daemon.stub, "across", lambda seen: len(ticks(seen)) >= 3, "ticks")
    await restart(daemon, "sigkill")
    at_restart = max(ticks(await logs(daemon.stub, "across")))
    await follow_until(
        daemon.stub,
        "across",
        lambda seen: max(ticks(seen), default=-1) >= at_restart + 5,
        "ticks after the restart",
    )
    await daemon.stub.Stop(pb.StopRequest(computation_id="across"), timeout=WAIT)

    ended = await logs(daemon.stub, "across")
    numbers = ticks(ended)
    assert ended[0] == "BOOTED across"
    assert numbers == list(range(numbers[-1] + 1)) and numbers[-1] >= at_restart + 5
    assert "cocos-manager" not in " ".join(ended)  # nothing dropped, nothing lost
    assert console_files(tmp_path) == [], "the console file outlived its VM"


async def test_a_vm_that_ended_while_no_daemon_ran_keeps_its_console_for_the_post_mortem(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await start(daemons, settings(tmp_path), tmp_path / "daemon.log")
    await daemon.stub.Run(run_request("gone"), timeout=WAIT)
    await follow_until(daemon.stub, "gone", lambda seen: len(ticks(seen)) >= 3, "ticks")
    pid = qemu_pid(daemon)
    await daemon.kill()
    os.kill(pid, signal.SIGTERM)  # the stand-in's last words, on stderr, with no daemon
    await wait_for(lambda: not os.path.exists(f"/proc/{pid}/cmdline"), "QEMU's end")
    await daemon.start()

    assert list((await daemon.stub.List(pb.ListRequest(), timeout=5)).computations) == []
    try:
        ended = await logs(daemon.stub, "gone")
    except grpc.aio.AioRpcError as error:
        raise AssertionError(f"no post-mortem: Logs answered {error.code().name}") from None
    assert ended[0] == "BOOTED gone"
    assert ended[-1] == "qemu-system-x86_64: terminating on signal 15"
    numbers = ticks(ended)
    assert numbers == list(range(numbers[-1] + 1))
    assert console_files(tmp_path) == []


async def test_get_shows_a_vm_that_ended_while_no_daemon_ran_as_ended(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Get answered NOT_FOUND for it while Logs had its console: now it is an ended VM, with
    what is known of its end (when, from its console file; its last lines). List and CVMInfo
    treat it as any ended VM: not listed, NOT_FOUND."""
    daemon = await start(daemons, settings(tmp_path), tmp_path / "daemon.log")
    await daemon.stub.Run(run_request("gone"), timeout=WAIT)
    await follow_until(daemon.stub, "gone", lambda seen: len(ticks(seen)) >= 3, "ticks")
    pid = qemu_pid(daemon)
    await daemon.kill()
    killed_at = time.time()
    os.kill(pid, signal.SIGTERM)
    await wait_for(lambda: not os.path.exists(f"/proc/{pid}/cmdline"), "QEMU's end")
    await daemon.start()

    try:
        vm = await daemon.stub.Get(pb.GetRequest(computation_id="gone"), timeout=5)
    except grpc.aio.AioRpcError as error:
        raise AssertionError(f"Get answered {error.code().name}") from None
    assert vm.computation.state == "ended" and vm.computation.pid == 0
    assert not vm.computation.HasField("expires_at") and not vm.files
    assert vm.computation.started_at.ToSeconds() <= killed_at
    assert "-machine" in vm.qemu_argv
    assert vm.settings["MANAGER_QEMU_AGENT_CHANNEL"] == "fw_cfg"
    end = vm.last_exit
    assert (end.reason, end.exit) == ("recovery", "ended while the manager was down")
    assert (end.event_type, end.status) == ("", "")  # nothing was published of it
    assert killed_at <= end.ended_at.ToNanoseconds() / 1e9 <= time.time()
    assert end.last_lines[-1] == "qemu-system-x86_64: terminating on signal 15"
    assert list((await daemon.stub.List(pb.ListRequest(), timeout=5)).computations) == []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await daemon.stub.CVMInfo(pb.CVMInfoReq(id="gone"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND

    # As one that ended while the daemon ran: the same three answers.
    await daemon.stub.Run(run_request("stopped"), timeout=WAIT)
    await daemon.stub.Stop(pb.StopRequest(computation_id="stopped"), timeout=WAIT)
    stopped = await daemon.stub.Get(pb.GetRequest(computation_id="stopped"), timeout=5)
    assert stopped.computation.state == "ended" and stopped.last_exit.reason == "stop"
    assert list((await daemon.stub.List(pb.ListRequest(), timeout=5)).computations) == []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await daemon.stub.CVMInfo(pb.CVMInfoReq(id="stopped"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND


KEEPER_LOST = "cocos-manager: the console keeper"


def keeper_of(tmp_path: Path) -> int:
    (pid,) = console_keepers(str(tmp_path / "vms"))
    return pid


def keeper_warnings(log: Path) -> list[dict[str, object]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        doc = json.loads(line) if line.startswith("{") else {}
        if doc.get("level") == "warn" and str(doc["message"]).startswith("the console keeper"):
            found.append(doc)
    return found


async def event_with(stream: AsyncIterator[pb.ClientStreamMessage], text: str) -> str:
    async def read() -> str:
        async for message in stream:
            if message.agent_log.message.startswith(text):
                return message.agent_log.level
        raise AssertionError("Events ended")

    return await asyncio.wait_for(read(), WAIT)


@pytest.mark.parametrize("when", ["running", "while-down", "after-adoption"])
async def test_a_killed_console_keeper_is_told_once_while_qemu_runs(
    tmp_path: Path, daemons: list[Daemon], when: str
) -> None:
    """Killing a VM's keeper lost its console silently. Now the daemon notices (its child
    reaped; an adopted VM's keeper watched by its pidfd, or found gone at adoption) and, as
    for the console's other losses, says so: a warning in its log, once, and a `warn` line
    on Logs and Events. A VM that ends normally says nothing of the kind."""
    log = tmp_path / "daemon.log"
    daemon = await start(daemons, settings(tmp_path), log)
    await daemon.stub.Run(run_request("kept"), timeout=WAIT)
    await follow_until(daemon.stub, "kept", lambda seen: len(ticks(seen)) >= 3, "ticks")
    qemu, keeper = qemu_pid(daemon), keeper_of(tmp_path)
    if when == "while-down":
        await daemon.kill()
        assert gone_within(keeper, WAIT, kill=True)
        await daemon.start()
    elif when == "after-adoption":
        await restart(daemon, "sigkill")
        await follow_until(daemon.stub, "kept", lambda seen: len(ticks(seen)) >= 6, "ticks")
    events = daemon.stub.Events(pb.EventsRequest(computation_id="kept", since=0))
    if when != "while-down":
        assert gone_within(keeper, WAIT, kill=True)
    try:
        assert await event_with(events, KEEPER_LOST) == "warn"
    finally:
        events.cancel()
    seen = await follow_until(
        daemon.stub, "kept", lambda seen: any(KEEPER_LOST in s for s in seen), "the loss"
    )
    told = next(s for s in seen if KEEPER_LOST in s)
    assert "gone while QEMU runs: QEMU's output from now on is lost" in told
    if when == "after-adoption":  # found by the file it holds, watched by its pidfd
        assert f"keeper (pid {keeper})" in told
    assert not gone_within(qemu, 0), "QEMU was not left running"
    (warning,) = keeper_warnings(log)
    assert warning["computation_id"] == "kept"

    await daemon.stub.Run(run_request("ends"), timeout=WAIT)
    await daemon.stub.Stop(pb.StopRequest(computation_id="ends"), timeout=WAIT)
    await daemon.stub.Stop(pb.StopRequest(computation_id="kept"), timeout=WAIT)
    assert len(keeper_warnings(log)) == 1
    assert not [s for s in await logs(daemon.stub, "ends") if KEEPER_LOST in s]


async def test_a_flooding_guest_fills_at_most_the_bound_and_the_drop_is_counted(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    bound = 256 * 1024
    lines = 20_000  # of 100 bytes: 2 MB, eight times the bound
    env = settings(
        tmp_path,
        FAKE_QEMU_TICK="0",
        FAKE_QEMU_BURST=str(lines),
        MANAGER_CONSOLE_FILE_BYTES=str(bound),
        MANAGER_LOG_HISTORY_LINES=str(10 * lines),
        MANAGER_LOG_HISTORY_BYTES=str(64 * 1024 * 1024),
    )
    daemon = await start(daemons, env, tmp_path / "daemon.log")
    await daemon.stub.Run(run_request("flood"), timeout=WAIT)
    await follow_until(daemon.stub, "flood", lambda seen: "BOOTED flood" in seen, "BOOTED")
    pid = qemu_pid(daemon)
    await daemon.kill()
    os.kill(pid, signal.SIGUSR1)  # the flood, while no daemon runs

    def flooded() -> bool:
        return any(b"burst done" in data for data in console_bytes(tmp_path))

    await wait_for(flooded, "the flood in the console file", WAIT)
    on_disk = sum(len(data) for data in console_bytes(tmp_path))
    assert on_disk <= bound, f"{on_disk} bytes of console on disk, bound {bound}"

    await daemon.start()
    history = await logs(daemon.stub, "flood")
    note = re.fullmatch(r"cocos-manager: (\d+) console lines dropped \(.*\)", history[0])
    assert note, f"the drop is not told first: {history[:2]}"
    dropped = int(note.group(1))
    # Line 0 was BOOTED, line 1 + i is "burst i": the first kept is the one after the drop.
    assert history[1].startswith(f"burst {dropped - 1} "), history[1]
    assert history[-1] == "burst done"
    assert len(history) - 1 == lines + 2 - dropped  # every line after the drop is there
    assert dropped > lines // 2  # the bound held 2 MB to a fraction

    # While the daemon runs, the bound holds too.
    os.kill(pid, signal.SIGUSR1)
    floods: list[str] = []

    async def two_floods() -> bool:
        floods[:] = await logs(daemon.stub, "flood")
        return floods.count("burst done") == 2

    for _ in range(int(WAIT / 0.1)):
        if await two_floods():
            break
        await asyncio.sleep(0.1)
    assert floods.count("burst done") == 2, f"the second flood never came: {floods[-2:]}"
    on_disk = sum(len(data) for data in console_bytes(tmp_path))
    assert on_disk <= bound, f"{on_disk} bytes of console on disk, bound {bound}"


async def test_a_console_bound_too_small_for_a_line_is_refused_at_start(tmp_path: Path) -> None:
    env = settings(tmp_path, MANAGER_CONSOLE_FILE_BYTES="65536")
    daemon = Daemon(env=env, log=tmp_path / "daemon.log")
    with pytest.raises(RuntimeError):
        await daemon.start(timeout=20)
    assert "MANAGER_CONSOLE_FILE_BYTES" in daemon.log_tail()
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").glob("vm-*"))
