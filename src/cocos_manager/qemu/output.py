"""QEMU's stdout and stderr as lines: what the logs, Events and a failed start's message quote.

Firmware and guest consoles paint the terminal (OVMF's escapes, carriage returns) and a guest
may print without newlines: the escapes are stripped and a line is cut at a bound, so one
VM's output can neither garble a log nor grow the daemon's memory.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

# CSI with any parameter bytes (OVMF sends "ESC [ = 3 h"), charset selection ("ESC ( B"), and
# the other two-byte escapes.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[ -/]+[0-~]|[@-Z\\-_])")
MAX_LINE = 64 * 1024


def clean_line(raw: bytes) -> str:
    """A line as logs and Logs show it: escapes and carriage returns gone, no trailing space."""
    return _ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r", "").rstrip()


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
        if text := clean_line(raw):
            self._sink(self._stream, text)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        if not self.closed.done():
            self.closed.set_result(None)
