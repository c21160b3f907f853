"""Console history of VMs (Logs): bounds in lines and bytes, followers that fall behind,
and how long ended VMs' consoles stay readable."""

from __future__ import annotations

import asyncio

import pytest

from cocos_manager.config.settings import ServiceSettings
from cocos_manager.events.console import (
    FOLLOW_QUEUE_LINES,
    LINE_OVERHEAD,
    ConsoleArchive,
    ConsoleLine,
    ConsoleLog,
)


def texts(lines: list[ConsoleLine]) -> list[str]:
    return [line.text for line in lines]


def test_ring_keeps_the_newest_lines_by_count() -> None:
    log = ConsoleLog("c", max_lines=3, max_bytes=1 << 20)
    for i in range(5):
        log.append("info", f"line {i}")
    assert texts(log.tail()) == ["line 2", "line 3", "line 4"]
    assert texts(log.tail(2)) == ["line 3", "line 4"]
    assert texts(log.tail(0)) == texts(log.tail(10)) == ["line 2", "line 3", "line 4"]
    assert log.dropped == 2


def test_ring_is_bounded_in_bytes() -> None:
    per_line = len("x" * 100) + len("info") + LINE_OVERHEAD
    log = ConsoleLog("c", max_lines=1000, max_bytes=per_line * 4)
    for _ in range(50):
        log.append("info", "x" * 100)
    assert len(log) == 4
    assert log.size_bytes == per_line * 4
    # Empty lines cost their overhead: a flood of them is bounded too.
    for _ in range(1000):
        log.append("info", "")
    assert log.size_bytes <= per_line * 4


def test_a_line_larger_than_the_budget_is_cut_not_kept_whole() -> None:
    log = ConsoleLog("c", max_lines=10, max_bytes=1000)
    log.append("info", "é" * 5000)  # two bytes each: the cut must not split a character
    (line,) = log.tail()
    assert log.size_bytes <= 1000
    assert line.text and set(line.text) == {"é"}


def test_lines_become_agent_logs_with_their_time() -> None:
    log = ConsoleLog("comp-1", 10, 10_000)
    log.append("warn", "qemu said", timestamp_ns=1_700_000_000_250_000_000)
    message = log.tail()[0].to_pb("comp-1")
    assert message.computation_id == "comp-1"
    assert message.level == "warn" and message.message == "qemu said"
    assert message.timestamp.seconds == 1_700_000_000
    assert message.timestamp.nanos == 250_000_000


async def collect(log: ConsoleLog, count: int = 0) -> list[str]:
    return [line.text async for line in log.follow(count)]


async def test_follow_gives_the_tail_then_new_lines_until_closed() -> None:
    log = ConsoleLog("c", 100, 1 << 20)
    for i in range(5):
        log.append("info", f"old {i}")
    reader = asyncio.ensure_future(collect(log, 2))
    await asyncio.sleep(0)  # the follower registers
    assert log.follower_count == 1
    log.append("info", "new 0")
    log.append("warn", "new 1")
    log.close()
    assert await asyncio.wait_for(reader, 5) == ["old 3", "old 4", "new 0", "new 1"]
    assert log.follower_count == 0


async def test_follow_of_an_ended_log_gives_the_tail_and_ends() -> None:
    log = ConsoleLog("c", 100, 1 << 20)
    log.append("info", "last words")
    log.close()
    assert await asyncio.wait_for(collect(log), 5) == ["last words"]
    log.append("info", "drained after the end")  # kept for the post-mortem
    assert texts(log.tail()) == ["last words", "drained after the end"]


async def test_a_slow_follower_loses_lines_and_is_told_how_many_where() -> None:
    log = ConsoleLog("c", 10 * FOLLOW_QUEUE_LINES, 1 << 30)
    stream = log.follow()
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    total = FOLLOW_QUEUE_LINES + 250
    for i in range(total):  # the producer never waits for the reader
        log.append("info", f"l{i}")
    log.append("info", "after")  # room again? no: the reader has not read yet
    assert (await first).text == "l0"
    got = [(await anext(stream)).text for _ in range(FOLLOW_QUEUE_LINES - 1)]
    assert got[-1] == f"l{FOLLOW_QUEUE_LINES - 1}"
    log.append("info", "caught up")
    marker = await anext(stream)
    assert marker.level == "warn"
    assert "251 console lines lost" in marker.text  # l1000..l1249 and "after"
    assert (await anext(stream)).text == "caught up"
    log.close()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert len(log) == total + 2  # the ring itself lost nothing


async def test_cancelling_a_follower_unregisters_it() -> None:
    log = ConsoleLog("c", 100, 1 << 20)
    reader = asyncio.ensure_future(collect(log))
    await asyncio.sleep(0)
    assert log.follower_count == 1
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert log.follower_count == 0
    log.append("info", "nobody listens")  # and nothing blows up


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ended_consoles_stay_readable_for_the_retention() -> None:
    clock = Clock()
    archive = ConsoleArchive(10, 10_000, retention=60.0, retained_vms=5, clock=clock)
    log = archive.open("vm")
    log.append("warn", "kernel panic")
    archive.close(log)
    assert log.closed
    assert archive.get("vm") is log
    clock.now += 59
    assert archive.get("vm") is log
    clock.now += 1
    assert archive.get("vm") is None
    assert archive.retained == []


def test_only_the_newest_ended_consoles_are_kept() -> None:
    clock = Clock()
    archive = ConsoleArchive(10, 10_000, retention=3600.0, retained_vms=2, clock=clock)
    for name in ("a", "b", "c"):
        clock.now += 1
        archive.close(archive.open(name))
    assert archive.retained == ["b", "c"]
    assert archive.get("a") is None
    assert archive.get("b") is not None


def test_zero_retained_vms_keeps_nothing_after_the_end() -> None:
    archive = ConsoleArchive(10, 10_000, retention=3600.0, retained_vms=0)
    log = archive.open("a")
    assert archive.get("a") is log
    archive.close(log)
    assert archive.get("a") is None


async def test_a_computation_run_again_shows_its_live_console() -> None:
    archive = ConsoleArchive(10, 10_000)
    first = archive.open("again")
    first.append("info", "first run")
    archive.close(first)
    second = archive.open("again")
    second.append("info", "second run")
    assert archive.get("again") is second
    assert texts(second.tail()) == ["second run"]
    assert archive.live("again") is second
    archive.close(first)  # a late close of the old run changes nothing
    assert archive.get("again") is second and not second.closed


async def test_opening_again_while_live_ends_the_old_followers() -> None:
    archive = ConsoleArchive(10, 10_000)
    old = archive.open("x")
    reader = asyncio.ensure_future(collect(old))
    await asyncio.sleep(0)
    archive.open("x")
    assert await asyncio.wait_for(reader, 5) == []


def test_settings_give_the_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_LOG_HISTORY_LINES", "7")
    monkeypatch.setenv("MANAGER_LOG_HISTORY_BYTES", "4096")
    monkeypatch.setenv("MANAGER_LOG_RETENTION", "10m")
    monkeypatch.setenv("MANAGER_LOG_RETAINED_VMS", "3")
    archive = ConsoleArchive.from_settings(ServiceSettings())
    assert (archive.max_lines, archive.max_bytes) == (7, 4096)
    assert (archive.retention, archive.retained_vms) == (600.0, 3)
