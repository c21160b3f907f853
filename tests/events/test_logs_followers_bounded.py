"""Logs followers cost bounded memory, in bytes, whatever the guest prints and however slowly
they read; and the number of Logs streams is capped, as Events subscribers are.

Against the real daemon (a subprocess, whose RSS is measured) with the stand-in QEMU as a
chatty guest printing 64 KiB lines. The followers are grpcurl processes stopped by SIGSTOP
(as `cocos-manager logs -f | less`, paused): they read nothing at all, so what they have not
read stays in the daemon.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from cocos_manager.events.console import LINE_OVERHEAD, ConsoleLog
from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request, running_manager
from tests.support.waiting import GUARD, wait_for

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
LINE = 64 * 1024
WARM_UP = 400  # lines printed before the followers come (Events retention fills: 16 MiB)
LINES = 2400  # 150 MiB of console output in all
FOLLOWERS = 5
MiB = 1024 * 1024


@asynccontextmanager
async def stopped_followers(
    daemon: Daemon, computation_id: str, count: int, out: Path
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`count` Logs followers that subscribe and then read nothing (SIGSTOP)."""
    followers = []
    try:
        for i in range(count):
            with open(out / f"follower-{i}.json", "wb") as sink:
                followers.append(
                    await asyncio.create_subprocess_exec(
                        GRPCURL, "-plaintext", "-d",
                        f'{{"computation_id": "{computation_id}", "follow": true}}',
                        daemon.address, "manager.ManagerService/Logs",
                        stdout=sink,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,  # stopped and continued as one group
                    )
                )  # fmt: skip
        yield followers
    finally:
        for follower in followers:
            os.killpg(follower.pid, signal.SIGKILL)
            await follower.wait()


async def last_line(daemon: Daemon, computation_id: str) -> str:
    lines = [
        line.message
        async for line in daemon.stub.Logs(
            pb.LogsRequest(computation_id=computation_id, tail=1), timeout=30
        )
    ]
    return lines[-1] if lines else ""


async def printed(daemon: Daemon, computation_id: str, number: int) -> bool:
    """Whether the guest's console shows line `number` or a later one."""
    text = await last_line(daemon, computation_id)
    return text == "CHATTY DONE" or (text.startswith("chatty ") and int(text.split()[1]) >= number)


async def wait_printed(daemon: Daemon, computation_id: str, number: int) -> None:
    for _ in range(6000):  # bounded: the stand-in prints 100 lines a second, so ~30 s here
        if await printed(daemon, computation_id, number):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the guest never printed line {number}")


async def test_followers_that_do_not_read_keep_the_daemon_flat(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {
        "FAKE_QEMU_MODE": f"chatty:{LINES}:{LINE}:100",
        "MANAGER_LOG_HISTORY_BYTES": str(256 * 1024),
    }
    daemon = Daemon(env=env, log=tmp_path / "daemon.log")
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("c1"), timeout=30)
        await wait_printed(daemon, "c1", WARM_UP)
        before = daemon.rss()
        async with stopped_followers(daemon, "c1", FOLLOWERS, tmp_path) as followers:
            await wait_for(
                lambda: all(
                    os.path.getsize(tmp_path / f"follower-{i}.json") for i in range(FOLLOWERS)
                ),
                "every follower to get its first lines",
                within=60,
            )
            for follower in followers:
                os.killpg(follower.pid, signal.SIGSTOP)
            await wait_printed(daemon, "c1", LINES)
            during = daemon.rss()
        print(f"RSS before {before / MiB:.1f} MiB, with {FOLLOWERS} stopped followers "
              f"{during / MiB:.1f} MiB")  # fmt: skip
        # The followers' share: one console's worth of bytes each, and gRPC's window.
        assert during - before < 24 * MiB, (before, during)
    finally:
        await daemon.terminate()


async def test_a_follower_holds_at_most_its_consoles_bytes_and_is_told_at_the_drain() -> None:
    line_size = 1000 + len("info") + LINE_OVERHEAD
    log = ConsoleLog("c", 1000, 3 * line_size)  # the console keeps 3 such lines
    stream = log.follow()
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    for i in range(50):  # the reader reads nothing meanwhile
        log.append("info", f"{i:04d}" + "x" * 996)
    assert (await first).text.startswith("0000")
    got = [(await asyncio.wait_for(anext(stream), GUARD)).text[:4] for _ in range(2)]
    assert got == ["0001", "0002"]  # all its queue held: 3 lines' bytes
    # Nothing more is printed: the loss at the end is told once the reader caught up.
    marker = await asyncio.wait_for(anext(stream), GUARD)
    assert (marker.level, marker.text) == (
        "warn",
        "cocos-manager: 47 console lines lost (reader too slow)",
    )
    log.append("info", "later")
    assert (await asyncio.wait_for(anext(stream), GUARD)).text == "later"


async def test_logs_streams_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_LOG_MAX_STREAMS="2") as manager:
        await manager.stub.Run(run_request("c1"), timeout=30)
        consoles = manager.service.ctx.consoles
        followers = [
            manager.stub.Logs(pb.LogsRequest(computation_id="c1", follow=True)) for _ in range(2)
        ]
        for follower in followers:  # the kept tail first: each stream is open by then
            assert (await asyncio.wait_for(follower.read(), GUARD)) is not grpc.aio.EOF
        for request in (
            pb.LogsRequest(computation_id="c1"),
            pb.LogsRequest(computation_id="c1", follow=True),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in manager.stub.Logs(request, timeout=30):
                    pass
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == "Logs: 2 streams already (MANAGER_LOG_MAX_STREAMS=2)"
        # Refused, unknown and invalid requests hold nothing.
        for bad, code in (
            ("nope", grpc.StatusCode.NOT_FOUND),
            ("", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in manager.stub.Logs(pb.LogsRequest(computation_id=bad), timeout=30):
                    pass
            assert caught.value.code() in (code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert consoles.streams == 2
        # A follower that leaves gives its place back.
        followers[0].cancel()
        await wait_for(lambda: consoles.streams == 1, "the cancelled follower to be counted out")
        tail = [
            line
            async for line in manager.stub.Logs(pb.LogsRequest(computation_id="c1"), timeout=30)
        ]
        assert tail and consoles.streams == 1
        # The VM ends: its followers' streams end, and are counted out.
        await manager.stub.Stop(pb.StopRequest(computation_id="c1"), timeout=30)
        while await asyncio.wait_for(followers[1].read(), GUARD) is not grpc.aio.EOF:
            pass
        await wait_for(lambda: consoles.streams == 0, "every stream to be counted out")
