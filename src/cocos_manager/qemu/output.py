"""QEMU's stdout and stderr as lines: what the logs, Events and a failed start's message quote.

Firmware and guest consoles paint the terminal (OVMF's escapes, carriage returns) and a guest
may print without newlines: the escapes are stripped and a line is cut at a bound, so one
VM's output can neither garble a log nor grow the daemon's memory.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections import deque
from collections.abc import Callable

# CSI with any parameter bytes (OVMF sends "ESC [ = 3 h"), charset selection ("ESC ( B"), and
# the other two-byte escapes.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[ -/]+[0-~]|[@-Z\\-_])")
MAX_LINE = 64 * 1024
TAIL_LINES = 20
LineCallback = Callable[[str, str], None]


class LineReader(asyncio.Protocol):
    """Splits a pipe into lines for logs and Events; bounded memory per line."""

    def __init__(self, stream: str, sink: Callable[[str, str], None]) -> None:
        self._stream = stream
        self._sink = sink
        self._partial = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        while len(self._partial) > MAX_LINE:  # output without newlines: cut, keep memory flat
            lines.append(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]
        for raw in lines:
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        text = _ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r", "").rstrip()
        if text:
            self._sink(self._stream, text)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        if not self.closed.done():
            self.closed.set_result(None)


class QemuOutput:
    """One QEMU's stdout and stderr: each line to the VM's callback, and the last few kept for
    the error a failed start or an exit answers with."""

    def __init__(self, popen: subprocess.Popen[bytes] | None, on_line: LineCallback | None) -> None:
        self._popen = popen
        self._on_line = on_line
        self._tail: deque[tuple[str, str]] = deque(maxlen=TAIL_LINES)
        self._pipes: list[asyncio.Future[None]] = []
        self._attached: set[str] = set()

    async def attach(self) -> None:
        """Connects QEMU's stdout and stderr to the line callback."""
        assert self._popen is not None
        loop = asyncio.get_running_loop()
        for stream, pipe in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
            if pipe is None or pipe.closed:
                continue
            reader = LineReader(stream, self._line)
            self._pipes.append(reader.closed)
            try:
                await loop.connect_read_pipe(lambda r=reader: r, pipe)  # type: ignore[misc]
            except BaseException:
                pipe.close()
                reader.connection_lost(None)
                raise
            self._attached.add(stream)

    def close_unattached(self) -> None:
        """Pipes never attached (a start cancelled in attach) are closed here."""
        if self._popen is not None:
            for stream, pipe in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
                if pipe is not None and stream not in self._attached:
                    pipe.close()

    def _line(self, stream: str, text: str) -> None:
        self._tail.append((stream, text))
        if self._on_line is not None:
            self._on_line(stream, text)

    def tail(self, stream: str | None = None) -> list[str]:
        return [text for s, text in self._tail if stream is None or s == stream]

    async def wait(self, timeout: float = 1.0) -> None:
        """After exit, the last lines may still be in the pipes: let them arrive. Never cancels
        the readers (as a timed-out gather would): a process that inherited QEMU's output can
        hold it open past any wait, and its lines still belong to the VM."""
        if pending := [pipe for pipe in self._pipes if not pipe.done()]:
            await asyncio.wait(pending, timeout=timeout)

    def failure_text(self) -> str:
        """QEMU's own words, for a status message: its stderr, else whatever it printed."""
        lines = self.tail("stderr") or self.tail()
        return "; ".join(lines[-5:]) if lines else "(QEMU printed nothing)"
