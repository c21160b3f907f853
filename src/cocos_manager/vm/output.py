"""Where a VM's QEMU output lines go: its console (Logs), Events, and the daemon's own log.

Every line reaches Events and the console; the daemon's log takes them at a bounded rate
(events/console_limit.py), so a chatty guest cannot trip journald's limit and hide the daemon's errors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from cocos_manager.config import ServiceSettings
from cocos_manager.events import (
    ConsoleArchive,
    ConsoleLog,
    ConsoleLogLimiter,
    EventBus,
    log_message,
)
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu import ConsoleFiles, read_history


def level_of(stream: str) -> str:
    return "info" if stream == "stdout" else "warn"


POST_MORTEM_LINES = 20
"""The last console lines Get shows of a VM found ended at a restart (as QemuOutput keeps
them of one that exits while watched)."""


@dataclass(frozen=True)
class PostMortem:
    """What the console file tells of a VM's end: when (seconds since the epoch: the keeper's
    last record, else its last line, else the moment it was read) and its last lines."""

    ended_at: float
    last_lines: list[str]


def keep_post_mortem(
    consoles: ConsoleArchive, computation_id: str, files: ConsoleFiles
) -> PostMortem:
    """A VM that ended while no daemon ran (found so after a restart): its console file
    becomes its ended console, readable with Logs for the retention as any ended VM's."""
    log = consoles.open(computation_id)
    tail: deque[str] = deque(maxlen=POST_MORTEM_LINES)

    def line(stream: str, text: str, stamp: int, _: bool) -> None:
        log.append(level_of(stream), text, stamp)
        tail.append(text)

    end = read_history(files, line)
    consoles.close(log)
    return PostMortem(end / 1e9 if end is not None else time.time(), list(tail))


# The range protobuf's Timestamp.ToNanoseconds accepts: years 1 to 9999.
_FIRST_SECOND, _LAST_SECOND = -62_135_596_800, 253_402_300_799


def append_agent_log(console: ConsoleLog, log: pb.AgentLog) -> None:
    """An agent's log line to its VM's console (Logs), at the time the agent gave it (outside
    years 1-9999: ours). The arithmetic is ToNanoseconds' own, without its Python-level
    checks (half of its cost on every agent line)."""
    stamp = None
    if log.HasField("timestamp"):
        given = log.timestamp
        seconds, nanos = given.seconds, given.nanos
        if _FIRST_SECOND <= seconds <= _LAST_SECOND and 0 <= nanos < 1_000_000_000:
            stamp = seconds * 1_000_000_000 + nanos
    console.append(log.level, log.message, stamp)


class VmOutput:
    def __init__(
        self,
        computation_id: str,
        console: ConsoleLog,
        bus: EventBus,
        settings: ServiceSettings,
        log: Any,
    ) -> None:
        self._id = computation_id
        self._console = console
        self._bus = bus
        self._log = log
        self._limit = ConsoleLogLimiter.from_settings(settings)

    def line(self, stream: str, text: str) -> None:
        level = level_of(stream)
        self._console.append(level, text)
        if self._limit.allow():
            self.note_suppressed()
            if level == "info":
                self._log.info(text, source="qemu-stdout")
            else:
                self._log.warning(text, source="qemu-stderr")
        self._bus.publish(log_message(self._id, level, text))

    def history(self, stream: str, text: str, timestamp_ns: int) -> None:
        """A line QEMU printed before this daemon took the VM over (read from its console
        file): the console has it, at the time it was printed; Events and the daemon's log
        had it from the daemon of that time, or never will (it ran while none did)."""
        self._console.append(level_of(stream), text, timestamp_ns)

    def lost(self, text: str) -> None:
        """A loss of the console itself (its keeper gone): once, at warning level in the
        daemon's log whatever its rate limit, and where Logs and Events readers are told of
        the console's other losses (a `warn` line "cocos-manager: ...")."""
        self._log.warning(text)
        notice = f"cocos-manager: {text}"
        self._console.append("warn", notice)
        self._bus.publish(log_message(self._id, "warn", notice))

    def note_suppressed(self) -> None:
        """Logs how many lines the limit held back since the last note (also when the VM ends)."""
        if note := self._limit.suppressed_note():
            self._log.warning(note)
