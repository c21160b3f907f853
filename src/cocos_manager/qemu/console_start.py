"""A VM's console keeper started with its QEMU: the file made for it, the pipes handed over,
the keeper forked by the zygote (keeper_zygote.py) or started on its own, and its end
watched. The file's reading is console_file.py; why a keeper at all: docs/decisions.md, "The
console survives the daemon"."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable

from cocos_manager.errors import FailedPreconditionError, ResourceExhaustedError
from cocos_manager.qemu import console_keeper
from cocos_manager.qemu.console_file import ConsoleFiles
from cocos_manager.qemu.keeper_zygote import Keeper, KeeperZygote
from cocos_manager.telemetry import get_logger

_log = get_logger()
FILE_MODE = console_keeper.FILE_MODE

Spawner = Callable[..., tuple[subprocess.Popen[bytes], int]]
KeeperStart = concurrent.futures.Future[Keeper]

# The keepers are started in a thread of their own, beside QEMU's spawn in the start workers:
# a Run never waits for its keeper (make bench), and a burst's keepers never queue ahead of
# its QEMUs. Forked by the zygote (keeper_zygote.py); started directly when it cannot.
_keepers = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="keeper")
_zygote = KeeperZygote(console_keeper.__file__)


def _start_keeper(console: ConsoleFiles, file_fd: int, out_r: int, err_r: int) -> Keeper:
    try:
        forked = _zygote.start(str(console.path), console.max_bytes, (file_fd, out_r, err_r))
        if forked is not None:
            return forked
        popen = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                console_keeper.__file__,
                str(console.path),
                str(console.max_bytes),
                str(file_fd),
                str(out_r),
                str(err_r),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(file_fd, out_r, err_r),
            start_new_session=True,  # outlives the daemon, as QEMU does
        )
        return Keeper(popen.pid, os.pidfd_open(popen.pid), popen)  # not reaped before that
    finally:
        for fd in (file_fd, out_r, err_r):
            os.close(fd)


def fresh_file(console: ConsoleFiles) -> int:
    """An empty console file for one QEMU, the daemon's own and private, handed to its keeper
    open: a keeper never opens it by name, so one that starts late never writes into the file
    of a later attempt, nor makes a file for a VM already released (it checks that the name
    is still its file)."""
    try:
        for path in (console.path, console.rotated):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(console.path, flags, FILE_MODE)
    except OSError as error:
        where = f"MANAGER_QEMU_TMP_FILE_LOC: cannot make {str(console.path)!r}"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhaustedError(f"{where}: no space left") from None
        raise FailedPreconditionError(f"{where}: {error.strerror}") from None
    try:
        os.fchmod(fd, FILE_MODE)  # the mode set, whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def spawn_kept(
    spawner: Spawner,
    argv: list[str],
    qmp_fd: int,
    env: dict[str, str] | None,
    console: ConsoleFiles | None,
) -> tuple[subprocess.Popen[bytes], int, KeeperStart | None]:
    """In a worker thread: QEMU (by `spawner`, spawn.spawn) with its output going to pipes,
    then the VM's keeper, handed their other ends, started in the keepers' thread while the
    Run goes on (what QEMU prints meanwhile waits in the pipes). The daemon keeps no end of
    them once the keeper has its own. Without `console`: pipes to the daemon."""
    if console is None:
        return (*spawner(argv, qmp_fd, env), None)
    file_fd = fresh_file(console)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        popen, start_time = spawner(argv, qmp_fd, env, stdout=out_w, stderr=err_w)
    except BaseException:
        for fd in (file_fd, out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    try:
        keeper: KeeperStart | None = _keepers.submit(_start_keeper, console, file_fd, out_r, err_r)
    except RuntimeError:  # the interpreter is shutting down; QEMU is the caller's all the same
        for fd in (file_fd, out_r, err_r):
            os.close(fd)
        keeper = None
    return popen, start_time, keeper


def reap_keeper(started: KeeperStart) -> asyncio.Future[None]:
    """Done once the keeper has ended (and, the daemon's child, been reaped: never left a
    zombie). A keeper that could not start is logged: that VM's output is lost."""
    reaped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish(_: object = None) -> None:
        if not reaped.done():
            reaped.set_result(None)

    def on_started(start: asyncio.Future[Keeper]) -> None:
        if start.cancelled() or (error := start.exception()) is not None:
            _log.error(
                "the console keeper could not start: this VM's console is not kept",
                error=repr(error) if not start.cancelled() else "cancelled",
            )
            finish()
            return
        reap_when_done(start.result()).add_done_callback(finish)

    asyncio.wrap_future(started).add_done_callback(on_started)
    return reaped


def reap_when_done(keeper: Keeper) -> asyncio.Future[None]:
    """Done once `keeper` has ended (its pidfd readable), reaped if it is the daemon's child."""
    loop = asyncio.get_running_loop()
    reaped: asyncio.Future[None] = loop.create_future()

    def ended() -> None:
        loop.remove_reader(keeper.pidfd)
        os.close(keeper.pidfd)
        if keeper.popen is not None:
            keeper.popen.poll()
        if not reaped.done():
            reaped.set_result(None)

    loop.add_reader(keeper.pidfd, ended)
    return reaped
