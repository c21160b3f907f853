"""Agent messages that come after their VM's end: the batch an agent connection held back
(paced by a slow Events subscriber) is published when the release cancels its wait, which is
after the VM's final event. They are not published (the final event is the computation's last
message, for Events, replays and the dial-out); they are counted
(`manager_agent_messages_late_total`), and logged once per computation so that a guest cannot
flood the log."""

from __future__ import annotations

from cocos_manager.telemetry import METRICS, get_logger

_log = get_logger()
REMEMBERED = 1024  # computations told of, the oldest forgotten first


class LateAgentMessages:
    def __init__(self) -> None:
        self._told: dict[str, None] = {}  # insertion-ordered: the oldest first

    def note(self, computation_id: str) -> None:
        METRICS.agent_messages_late.inc()
        if computation_id in self._told:
            return
        self._told[computation_id] = None
        if len(self._told) > REMEMBERED:
            del self._told[next(iter(self._told))]
        _log.warning(
            "agent messages that came after the VM was released are dropped: "
            "its final event is its last message",
            computation_id=computation_id,
        )
