"""QEMU's output becomes clean lines: split across reads, escape codes gone, bounded length."""

from __future__ import annotations

from cocos_manager.qemu_output import MAX_LINE, LineReader
from cocos_manager.qemu_spawn import ExitInfo


async def test_lines_are_split_cleaned_and_bounded() -> None:
    seen: list[tuple[str, str]] = []
    reader = LineReader("stdout", lambda stream, text: seen.append((stream, text)))
    reader.data_received(b"\x1b[2J\x1b[01;01H\x1b[=3hBOOT")
    reader.data_received(b"ED c1\r\nSERV")
    reader.data_received(b"ING c1\r\n\r\n\x1b(Bplain\n")
    reader.data_received(b"x" * (MAX_LINE + 10))
    reader.connection_lost(None)
    texts = [text for _, text in seen]
    assert texts[:3] == ["BOOTED c1", "SERVING c1", "plain"]
    assert sum(len(t) for t in texts[3:]) == MAX_LINE + 10
    assert all(len(t) <= MAX_LINE for t in texts)
    assert reader.closed.done()


def test_exit_descriptions() -> None:
    assert ExitInfo(0).describe() == "exit status 0"
    assert ExitInfo(-9).describe() == "killed by signal SIGKILL"
    assert ExitInfo(-9).signal == 9
    assert "unknown" in ExitInfo(None).describe()
