"""The keeper zygote with real processes and real pipes (no daemon): keepers forked by one
zygote write the same file as a keeper started alone, outlive the zygote, a zygote gone is
made again at the next keeper, and a zygote that cannot start leaves the keeper to the
caller's direct start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from pathlib import Path

import pytest

from cocos_manager.qemu import console_keeper, console_start, keeper_zygote
from cocos_manager.qemu.console_file import ConsoleFiles
from cocos_manager.qemu.console_start import fresh_file
from cocos_manager.qemu.keeper_zygote import Keeper, KeeperZygote
from cocos_manager.qemu.streams import QemuOutput
from tests.support.processes import gone_within

BOUND = 256 * 1024


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


class Pipes:
    """A stand-in QEMU's stdout and stderr: the write ends here, the read ends for a keeper."""

    def __init__(self, files: ConsoleFiles) -> None:
        self.files = files
        self.file_fd = fresh_file(files)
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()

    def handed(self) -> tuple[int, int, int]:
        return (self.file_fd, self.out_r, self.err_r)

    def close_ours(self) -> None:
        for fd in self.handed():
            os.close(fd)

    def finish(self, keeper: Keeper, text: bytes) -> list[bytes]:
        """Prints `text` on stdout, ends the output and returns the file's records' tags and
        payloads once the keeper has ended."""
        os.write(self.out_w, text)
        os.write(self.err_w, b"qemu: done\n")
        os.close(self.out_w)
        os.close(self.err_w)
        assert keeper.wait(10), "the keeper did not end at the end of its pipes"
        return [line.split(b" ", 2)[2] for line in self.files.path.read_bytes().splitlines()]


def test_keepers_are_forked_by_one_zygote_and_outlive_it(tmp_path: Path) -> None:
    zygote = KeeperZygote(console_keeper.__file__)
    try:
        first, second = (Pipes(ConsoleFiles(tmp_path / f"console-{i}.log", BOUND)) for i in (1, 2))
        kept = []
        for pipes in (first, second):
            keeper = zygote.start(str(pipes.files.path), BOUND, pipes.handed())
            pipes.close_ours()
            assert keeper is not None and keeper.popen is None
            kept.append(keeper)
        parent = parent_of(kept[0].pid)
        assert parent == parent_of(kept[1].pid) != os.getpid()  # the zygote's, not ours
        assert comm(parent) == "keeper-zygote" and comm(kept[0].pid) == "console-keeper"
        assert os.getsid(kept[0].pid) == kept[0].pid  # a session of its own, as QEMU's

        os.kill(parent, signal.SIGKILL)  # the zygote dies: its keepers go on
        assert first.finish(kept[0], b"one\n") == [b"V 1", b"O one", b"E qemu: done", b"X "]

        third = Pipes(ConsoleFiles(tmp_path / "console-3.log", BOUND))
        again = zygote.start(str(third.files.path), BOUND, third.handed())
        third.close_ours()
        assert again is not None and again.popen is None, "no zygote made again"
        assert parent_of(again.pid) not in (parent, os.getpid())
        assert second.finish(kept[1], b"two\n")[1] == b"O two"
        assert third.finish(again, b"three\n")[1] == b"O three"
    finally:
        zygote.close()


def test_a_zygote_ends_when_the_daemon_lets_go_of_it(tmp_path: Path) -> None:
    zygote = KeeperZygote(console_keeper.__file__)
    pipes = Pipes(ConsoleFiles(tmp_path / "console-1.log", BOUND))
    keeper = zygote.start(str(pipes.files.path), BOUND, pipes.handed())
    pipes.close_ours()
    assert keeper is not None
    parent = parent_of(keeper.pid)
    pidfd = os.pidfd_open(parent)
    try:
        zygote.close()  # as the daemon's exit, SIGKILL included, closes its end
        assert Keeper(parent, pidfd).wait(10), "the zygote outlived its daemon"
    finally:
        os.close(pidfd)
    assert pipes.finish(keeper, b"after\n")[1] == b"O after"


def test_without_a_zygote_the_keeper_is_started_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zygote that cannot start (here: no such script) never costs the VM its console."""
    broken = KeeperZygote(str(tmp_path / "missing.py"))
    pipes = Pipes(ConsoleFiles(tmp_path / "console-1.log", BOUND))
    assert broken.start(str(pipes.files.path), BOUND, pipes.handed()) is None
    monkeypatch.setattr(console_start, "_zygote", broken)
    keeper = console_start._start_keeper(pipes.files, *pipes.handed())
    assert keeper.popen is not None  # the daemon's own child, as before the zygote
    assert pipes.finish(keeper, b"direct\n") == [b"V 1", b"O direct", b"E qemu: done", b"X "]


def first_keeper(zygote: KeeperZygote, tmp_path: Path) -> tuple[Pipes, Keeper, int]:
    """A first keeper forked by `zygote` on its own pipes, and the zygote's pid (its parent)."""
    first = Pipes(ConsoleFiles(tmp_path / "console-1.log", BOUND))
    kept = zygote.start(str(first.files.path), BOUND, first.handed())
    first.close_ours()
    assert kept is not None
    return first, kept, parent_of(kept.pid)


def test_a_stuck_zygote_is_ended_and_the_keeper_started_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zygote that stops answering (here SIGSTOPped) is SIGKILLed after the answer's
    timeout; nothing was forked, so the caller starts the keeper, and the next keeper gets a
    new zygote."""
    monkeypatch.setattr(keeper_zygote, "ANSWER_TIMEOUT", 0.5)
    zygote = KeeperZygote(console_keeper.__file__)
    try:
        first, kept, stuck = first_keeper(zygote, tmp_path)
        os.kill(stuck, signal.SIGSTOP)
        second = Pipes(ConsoleFiles(tmp_path / "console-2.log", BOUND))
        assert zygote.start(str(second.files.path), BOUND, second.handed()) is None
        assert gone_within(stuck, 10), "the stuck zygote was left"
        third = Pipes(ConsoleFiles(tmp_path / "console-3.log", BOUND))
        again = zygote.start(str(third.files.path), BOUND, third.handed())
        third.close_ours()
        assert again is not None and parent_of(again.pid) != stuck
        assert first.finish(kept, b"one\n")[1] == b"O one"
        assert third.finish(again, b"three\n")[1] == b"O three"
        second.close_ours()
        os.close(second.out_w)
        os.close(second.err_w)
    finally:
        zygote.close()


def holders(path: Path) -> list[int]:
    """The processes holding `path` open."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(
                os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
                for fd in os.listdir(f"/proc/{pid}/fd")
            ):
                found.append(int(pid))
    return found


def test_a_keeper_that_cannot_answer_leaves_the_vm_to_one_direct_keeper(tmp_path: Path) -> None:
    """A forked keeper that cannot make its pidfd (the zygote's descriptor limit here; no
    memory likewise) answered nothing and kept the pipes all the same: the daemon, past the
    answer's timeout, started a second keeper on them (two keepers splitting QEMU's lines, two
    version records in one file). It says so now and ends, leaving the VM to the direct start."""
    zygote = KeeperZygote(console_keeper.__file__)
    try:
        first, kept, forker = first_keeper(zygote, tmp_path)
        held = {int(fd) for fd in os.listdir(f"/proc/{forker}/fd")}
        free = [fd for fd in range(3, max(held) + 5) if fd not in held]
        # Room for the request's three descriptors, none for the pidfd (lowest numbers first).
        resource.prlimit(forker, resource.RLIMIT_NOFILE, (free[3], free[3]))
        second = Pipes(ConsoleFiles(tmp_path / "console-2.log", BOUND))
        assert zygote.start(str(second.files.path), BOUND, second.handed()) is None
        keeper = console_start._start_keeper(second.files, *second.handed())
        for _ in range(1000):  # the forked one, told to end, ends at once; not before the fix
            if holders(second.files.path) == [keeper.pid]:
                break
            time.sleep(0.01)
        assert holders(second.files.path) == [keeper.pid], "a second keeper holds the file"
        assert second.finish(keeper, b"two\n") == [b"V 1", b"O two", b"E qemu: done", b"X "]
        assert first.finish(kept, b"one\n")[1] == b"O one"
    finally:
        zygote.close()


# A zygote that reads its first request and ends without a word (SIGKILLed or OOM-killed
# there); the ones made after it are the real one.
_DYING_ZYGOTE = """
import importlib.util, os, socket, sys
if os.path.exists({marker!r}):
    spec = importlib.util.spec_from_file_location("console_keeper", {real!r})
    keeper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(keeper)
    sys.exit(keeper.main(sys.argv))
open({marker!r}, "w").close()
if os.fork():
    os._exit(0)
channel = socket.socket(fileno=int(sys.argv[2]))
pidfd = os.pidfd_open(os.getpid())
socket.send_fds(channel, [b"%d" % os.getpid()], [pidfd])
socket.recv_fds(channel, 8192, 3)
os._exit(0)
"""


def test_a_zygote_that_ended_with_the_request_is_made_again_for_it(tmp_path: Path) -> None:
    """A zygote killed as a request reached it (queued before its end closed the socket) was
    read as 'no zygote': that keeper was started directly and the zygote made only at the
    next one (test_keepers_are_forked_by_one_zygote_and_outlive_it failed so under load)."""
    script = tmp_path / "dying_zygote.py"
    script.write_text(
        _DYING_ZYGOTE.format(marker=str(tmp_path / "died"), real=console_keeper.__file__)
    )
    zygote = KeeperZygote(str(script))
    try:
        pipes = Pipes(ConsoleFiles(tmp_path / "console-1.log", BOUND))
        keeper = zygote.start(str(pipes.files.path), BOUND, pipes.handed())
        pipes.close_ours()
        assert keeper is not None and keeper.popen is None, "no zygote made again"
        assert (tmp_path / "died").exists()
        made_again = parent_of(keeper.pid)
        assert pipes.finish(keeper, b"one\n") == [b"V 1", b"O one", b"E qemu: done", b"X "]
    finally:
        zygote.close()
    assert gone_within(made_again, 10), "the zygote outlived its end of file"


async def test_a_keeper_started_as_late_as_a_stuck_zygote_allows_is_waited_for() -> None:
    """A zygote that stopped answering holds a keeper's start for its whole answer timeout
    before the keeper is started alone. A QEMU that failed at start meanwhile has its words
    only in that keeper's pipes: the failure waits for the keeper's end, or it said "(QEMU
    printed nothing)" (the wait was 3 s, the answer timeout 5)."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    exited.set_result(None)
    output = QemuOutput(None, None, exited)
    output.keeper_reaped = reaped = loop.create_future()
    loop.call_later(keeper_zygote.ANSWER_TIMEOUT + 0.5, reaped.set_result, None)
    await output.keeper_gone(0.2)
    assert reaped.done(), "given up on before a keeper started after the zygote's timeout"
