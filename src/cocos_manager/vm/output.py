"""Where a VM's QEMU output lines go: its console (Logs), Events, and the daemon's own log.

Every line reaches Events and the console; the daemon's log takes them at a bounded rate
(events/console_limit.py), so a chatty guest cannot trip journald's limit and hide the daemon's errors.
"""

from __future__ import annotations

from typing import Any

from cocos_manager.config import ServiceSettings
from cocos_manager.events import ConsoleLog, ConsoleLogLimiter, EventBus, log_message


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
        level = "info" if stream == "stdout" else "warn"
        self._console.append(level, text)
        if self._limit.allow():
            self.note_suppressed()
            if level == "info":
                self._log.info(text, source="qemu-stdout")
            else:
                self._log.warning(text, source="qemu-stderr")
        self._bus.publish(log_message(self._id, level, text))

    def note_suppressed(self) -> None:
        """Logs how many lines the limit held back since the last note (also when the VM ends)."""
        if note := self._limit.suppressed_note():
            self._log.warning(note)
