"""The console keeper and its file, with real keeper processes and real pipes (no daemon): the
bound holds under a flood, a reader following across rotations loses nothing it could read
and counts what it could not, and a keeper whose VM was released never makes a file again."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest

from cocos_manager.errors import FailedPreconditionError
from cocos_manager.qemu import console_file, console_keeper
from cocos_manager.qemu.console_file import (
    ConsoleFiles,
    ConsoleReader,
    read_history,
)
from cocos_manager.qemu.console_start import fresh_file, spawn_kept
from cocos_manager.qemu.spawn import spawn
from tests.support.waiting import wait_for

BOUND = 256 * 1024
Line = tuple[str, str, bool]


def printer(lines: int, then: str = "") -> list[str]:
    """A stand-in QEMU printing `lines` numbered lines of 100 bytes, one on stderr."""
    script = (
        "import sys\n"
        f"for i in range({lines}):\n"
        "    sys.stdout.write(f'line {i} '.ljust(99, 'x') + '\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('qemu: done\\n')\n"
        f"{then}\n"
    )
    return ["python3", "-c", script]


async def run_kept(
    tmp_path: Path, argv: list[str], *, follow: bool
) -> tuple[ConsoleFiles, list[Line], subprocess.Popen[bytes]]:
    files = ConsoleFiles(tmp_path / "console-vm.log", BOUND)
    seen: list[Line] = []
    qmp = os.open("/dev/null", os.O_RDONLY)
    try:
        popen, _, keeper = spawn_kept(spawn, argv, qmp, None, files)
    finally:
        os.close(qmp)
    assert keeper is not None
    if follow:
        reader = ConsoleReader(
            files, lambda stream, text, _, live: seen.append((stream, text, live)), history=False
        )
        await asyncio.to_thread(popen.wait)
        await reader.drain(10)
        assert reader.ended.done()
    kept = await asyncio.wrap_future(keeper)
    await asyncio.to_thread(kept.wait, 10)
    await asyncio.to_thread(popen.wait)
    return files, seen, kept


def numbers(lines: list[Line]) -> list[int]:
    return [int(m.group(1)) for _, text, _ in lines if (m := re.match(r"line (\d+) ", text))]


async def test_a_follower_gets_every_line_in_order_and_the_disk_stays_bounded(
    tmp_path: Path,
) -> None:
    """3000 lines of 100 bytes: more than the bound, read while written: nothing lost."""
    files, seen, _ = await run_kept(tmp_path, printer(3000), follow=True)
    got = numbers(seen)
    dropped = [text for _, text, _ in seen if text.startswith("cocos-manager:")]
    if not dropped:  # the reader kept up (the usual case): every line, in order
        assert got == list(range(3000))
    else:  # a very slow loop: the gap is told, and what follows it is in order
        assert got == sorted(got) and got[-1] == 2999
    assert seen[-1] == ("stderr", "qemu: done", True)
    on_disk = sum(p.stat().st_size for p in (files.path, files.rotated) if p.exists())
    assert on_disk <= BOUND


async def test_the_history_of_a_flood_is_its_newest_lines_after_a_counted_drop(
    tmp_path: Path,
) -> None:
    """Nobody reads while 20,000 lines (2 MB) are printed: the file keeps the newest, and the
    history read later says how many went, then has every line after them."""
    files, _, _ = await run_kept(tmp_path, printer(20_000), follow=False)
    on_disk = sum(p.stat().st_size for p in (files.path, files.rotated) if p.exists())
    assert on_disk <= BOUND
    history: list[Line] = []
    read_history(files, lambda stream, text, _, live: history.append((stream, text, live)))
    note = re.fullmatch(r"cocos-manager: (\d+) console lines dropped \(.*\)", history[0][1])
    assert note and history[0][0] == "stderr"
    dropped = int(note.group(1))
    assert numbers(history) == list(range(dropped, 20_000))
    assert history[-1][:2] == ("stderr", "qemu: done")
    assert not any(live for *_, live in history)


@pytest.mark.parametrize("then", ["released", "next-attempt"])
async def test_a_keeper_whose_file_is_gone_writes_nothing_more(tmp_path: Path, then: str) -> None:
    """The VM's files are removed (released) or made anew for the next start attempt while
    this QEMU still prints (an output helper holds the pipe): its keeper reads on (QEMU never
    blocks), makes no file at a rotation and never touches the next attempt's file."""
    release = tmp_path / "released"
    wait = (
        "import os, sys, time\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
        "for i in range(5000):\n"
        "    sys.stdout.write(f'after {i} '.ljust(99, 'x') + '\\n')\n"
    )
    task = asyncio.ensure_future(run_kept(tmp_path, printer(10, wait), follow=False))
    files = ConsoleFiles(tmp_path / "console-vm.log", BOUND)
    await wait_for(lambda: files.path.exists() and files.path.stat().st_size > 0, "lines")
    for path in (files.path, files.rotated):
        path.unlink(missing_ok=True)
    if then == "next-attempt":
        os.close(fresh_file(files))
    release.touch()
    await asyncio.wait_for(task, 30)
    left = sorted(os.listdir(tmp_path))
    if then == "released":
        assert left == ["released"]
    else:
        assert left == ["console-vm.log", "released"]
        assert files.path.stat().st_size == 0, "the old keeper wrote into the new file"


async def test_each_attempt_gets_a_fresh_file_and_a_bad_directory_is_named(
    tmp_path: Path,
) -> None:
    files = ConsoleFiles(tmp_path / "console-vm.log", BOUND)
    files.path.write_bytes(b"0 1 O an earlier attempt\n0 2 X \n")
    files.rotated.write_bytes(b"older\n")
    fd = fresh_file(files)
    os.close(fd)
    assert files.path.stat().st_size == 0 and not files.rotated.exists()
    assert files.path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FailedPreconditionError, match="MANAGER_QEMU_TMP_FILE_LOC"):
        fresh_file(ConsoleFiles(tmp_path / "missing" / "console-vm.log", BOUND))


async def test_a_line_written_just_before_a_rotation_is_read_from_the_rotated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper writes a line and rotates between the reader's read at the end of FILE and
    its look at FILE (two of the keeper's syscalls between two of the reader's, as under a
    flood): the line is in FILE.1, which must be read to its end, not skipped as read."""
    files = ConsoleFiles(tmp_path / "console-vm.log", 1000)
    keeper = console_keeper.Sink(
        str(files.path), files.max_bytes, os.open(files.path, os.O_WRONLY | os.O_CREAT, 0o600)
    )
    seen: list[str] = []
    reader = ConsoleReader(files, lambda _, text, __, ___: seen.append(text), history=False)
    keeper.line(b"O", b"first")
    await wait_for(lambda: seen == ["first"], "the first line")
    look = console_file._inode

    def keeper_between(path: Path) -> int | None:
        if keeper.seq != 1:
            return look(path)
        keeper.line(b"O", b"before the rotation")
        keeper.line(b"O", b"rotating " + b"y" * 400)  # FILE -> FILE.1, then written to FILE
        return look(path)

    monkeypatch.setattr(console_file, "_inode", keeper_between)
    reader.poke()
    await wait_for(lambda: len(seen) == 3, "the lines around the rotation")
    reader.close()
    os.close(keeper.fd)
    assert seen[:2] == ["first", "before the rotation"]


async def test_a_reader_closed_before_it_ran_says_it_has_caught_up(tmp_path: Path) -> None:
    """A re-adopted VM released while recovery read its console (its QEMU died then): the
    reader was closed before its task first ran, so that task never ran its end, and
    recovery waited MANAGER_QEMU_ADOPT_TIMEOUT (10 s) on `caught_up` for nothing."""
    files = ConsoleFiles(tmp_path / "console-vm.log", BOUND)
    files.path.write_bytes(b"")
    reader = ConsoleReader(files, lambda *_: None, history=True)
    reader.close()  # in the same turn of the loop: its task has not run
    await asyncio.wait_for(asyncio.shield(reader.caught_up), 1.0)
    await asyncio.wait_for(asyncio.shield(reader.ended), 1.0)
