"""A console reader is woken by the kernel (inotify on the console directory) rather than by
its poll: with the poll made an hour long, a live QEMU's lines still arrive, across the
keeper's rotations; where no watch can be had it polls; and the daemon's one inotify
descriptor goes with its last reader. Real keeper processes and real pipes, no daemon."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path

import pytest

from cocos_manager.qemu import console_file, console_keeper, console_watch
from cocos_manager.qemu.console_file import ConsoleFiles, ConsoleReader
from cocos_manager.qemu.console_start import spawn_kept
from cocos_manager.qemu.spawn import spawn
from tests.support.waiting import wait_for

BOUND = 64 * 1024
LINES = 2000  # 200 kB of lines: the keeper rotates its file several times


def sink_and_reader(path: Path) -> tuple[console_keeper.Sink, ConsoleReader, list[str]]:
    """A keeper's writing end on a new console file at `path`, in this process, and a reader
    of that file with the lines it has read."""
    keeper = console_keeper.Sink(
        str(path), BOUND, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    )
    seen: list[str] = []
    reader = ConsoleReader(ConsoleFiles(path, BOUND), lambda _, text, *__: seen.append(text),
                           history=False)  # fmt: skip
    return keeper, reader, seen


def live_printer(quit_file: Path) -> list[str]:
    """A stand-in QEMU that prints its lines, then stays alive (as a booted guest) until
    `quit_file` exists: whatever the reader gets before that, it got while QEMU ran."""
    script = (
        "import os, sys, time\n"
        f"for i in range({LINES}):\n"
        "    sys.stdout.write(f'line {i} '.ljust(99, 'x') + '\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('qemu: ready\\n')\n"
        "sys.stderr.flush()\n"
        f"while not os.path.exists({str(quit_file)!r}): time.sleep(0.01)\n"
    )
    return ["python3", "-c", script]


async def follow_live(tmp_path: Path) -> list[tuple[str, str]]:
    """The lines a reader gets while the stand-in runs; then QEMU, its keeper and the reader
    end."""
    files = ConsoleFiles(tmp_path / "console-vm.log", BOUND)
    quit_file = tmp_path / "quit"
    seen: list[tuple[str, str]] = []
    reader = ConsoleReader(
        files, lambda stream, text, *_: seen.append((stream, text)), history=False
    )
    qmp = os.open("/dev/null", os.O_RDONLY)
    try:
        popen, _, keeper = spawn_kept(spawn, live_printer(quit_file), qmp, None, files)
    finally:
        os.close(qmp)
    assert keeper is not None
    try:
        await wait_for(lambda: ("stderr", "qemu: ready") in seen, "QEMU's lines, read live", 60)
        return list(seen)
    finally:
        quit_file.touch()
        await asyncio.to_thread(popen.wait)
        kept = await asyncio.wrap_future(keeper)
        await asyncio.to_thread(kept.wait, 10)
        await reader.drain(10)
        reader.close()


def numbers(lines: list[tuple[str, str]]) -> list[int]:
    return [int(m.group(1)) for _, text in lines if (m := re.match(r"line (\d+) ", text))]


async def test_a_live_qemus_lines_arrive_without_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_file, "POLL_INTERVAL", 3600.0)
    seen = await follow_live(tmp_path)
    got = numbers(seen)
    assert got == sorted(got) and got[-1] == LINES - 1
    assert not console_watch._watches, "the inotify descriptor outlived its last reader"


async def test_without_a_watch_the_reader_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_watch, "watch", lambda *_: None)
    seen = await follow_live(tmp_path)
    got = numbers(seen)
    assert got == sorted(got) and got[-1] == LINES - 1


async def test_the_inotify_descriptor_is_closed_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing an inotify descriptor waits for an RCU grace period (10-20 ms): on the loop,
    the last VM's vm-exit after a SIGKILL waited for it. It is closed in a thread."""
    files = ConsoleFiles(tmp_path / "console-vm.log", BOUND)
    files.path.touch()
    reader = ConsoleReader(files, lambda *_: None, history=False)
    await wait_for(lambda: console_watch._watches, "the reader's watch")
    watch_fd = next(iter(console_watch._watches.values()))._fd
    closed_on: list[threading.Thread] = []
    real_close = os.close

    def recording(fd: int) -> None:
        if fd == watch_fd:
            closed_on.append(threading.current_thread())
        real_close(fd)

    monkeypatch.setattr(os, "close", recording)
    reader.close()
    await wait_for(lambda: closed_on, "the inotify descriptor closed")
    assert closed_on[0] is not threading.current_thread()
    assert not console_watch._watches


async def test_inotify_descriptors_are_closed_by_one_kept_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread started per close held the loop until it ran (Thread.start waits for it),
    between a SIGKILLed QEMU's last console line and its vm-exit: one kept thread closes
    them, and the loop only hands the descriptor over."""
    real_close = os.close
    closed_on: list[tuple[int, threading.Thread]] = []
    watch_fd = -1

    def recording(fd: int) -> None:
        if fd == watch_fd:
            closed_on.append((fd, threading.current_thread()))
        real_close(fd)

    monkeypatch.setattr(os, "close", recording)
    for round_ in range(2):
        files = ConsoleFiles(tmp_path / f"console-vm{round_}.log", BOUND)
        files.path.touch()
        reader = ConsoleReader(files, lambda *_: None, history=False)
        await wait_for(lambda: console_watch._watches, "the reader's watch")
        watch_fd = next(iter(console_watch._watches.values()))._fd
        reader.close()
        await wait_for(lambda r=round_: len(closed_on) > r, "the inotify descriptor closed")
        watch_fd = -1  # its number is free for the next file opened
    (_, first), (_, second) = closed_on
    assert first is second and first is not threading.current_thread()


async def test_a_directory_made_again_under_its_name_is_watched_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TMP_FILE_LOC renamed away (or mounted over) and made again while a reader is alive: a
    watch kept by the directory's name would follow the old inode, and a reader of the new
    directory, never polled, would wait forever for its lines."""
    monkeypatch.setattr(console_file, "POLL_INTERVAL", 3600.0)
    where = tmp_path / "tmp"
    where.mkdir()
    first = ConsoleReader(ConsoleFiles(where / "console-a.log", BOUND), lambda *_: None,
                          history=False)  # fmt: skip
    await first.caught_up
    where.rename(tmp_path / "tmp.old")
    where.mkdir()
    keeper, second, seen = sink_and_reader(where / "console-b.log")
    await second.caught_up
    keeper.line(b"O", b"hello")
    try:
        await wait_for(lambda: seen == ["hello"], "the new directory's line")
    finally:
        first.close()
        second.close()
        os.close(keeper.fd)


async def test_a_drain_reads_the_last_record_as_soon_as_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU has ended and its `vm-exit` waits for the keeper's last record (a drain): the
    reader reads it when the kernel says it was written, not at the end of the gathering of
    wake-ups, nor at the drain's next poll (both an hour long here), nor when the keeper's
    end is seen (no keeper process here)."""
    monkeypatch.setattr(console_file, "POLL_INTERVAL", 3600.0)
    monkeypatch.setattr(console_file, "DRAIN_INTERVAL", 3600.0)
    monkeypatch.setattr(console_watch, "GATHER", 3600.0)
    keeper, reader, seen = sink_and_reader(tmp_path / "console-vm.log")
    try:
        await reader.caught_up
        watch = next(iter(console_watch._watches.values()))
        draining = asyncio.ensure_future(reader.drain(30))
        await wait_for(lambda: watch._hurried, "the drain under way")
        keeper.line(b"O", b"last words")
        keeper.end()
        await draining
        assert reader.last_record_read and seen == ["last words"]
        assert not watch._hurried  # drained: its wake-ups are gathered again
    finally:
        reader.close()
        os.close(keeper.fd)
