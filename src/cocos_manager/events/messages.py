"""The messages the manager itself puts on the event stream, and which computation a message
belongs to: manager events are shaped as the original's AgentEvent with originator "manager"."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.proto import manager_pb2 as pb

MANAGER_ORIGINATOR = "manager"
EVENTS_LOST = "events-lost"
MANAGER_SHUTDOWN = "manager-shutdown"
"""The manager's own notices of its shutdown: computation id empty (they concern every
computation, and reach every stream, filtered or not); `starting` before any VM is stopped,
`complete` as the last message of every Events stream."""


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def manager_event(
    computation_id: str, event_type: str, status: str, details: dict[str, Any] | None = None
) -> pb.ClientStreamMessage:
    """A Manager's own event, shaped as the original's AgentEvent with originator "manager"."""
    return pb.ClientStreamMessage(
        agent_event=pb.AgentEvent(
            event_type=event_type,
            timestamp=_now(),
            computation_id=computation_id,
            details=json.dumps(details, separators=(",", ":")).encode() if details else b"",
            originator=MANAGER_ORIGINATOR,
            status=status,
        )
    )


def shutdown_notice(status: str, details: dict[str, Any]) -> pb.ClientStreamMessage:
    """`manager-shutdown` with `status` (`starting`, `complete`): see MANAGER_SHUTDOWN."""
    return manager_event("", MANAGER_SHUTDOWN, status, details)


def log_message(computation_id: str, level: str, message: str) -> pb.ClientStreamMessage:
    return pb.ClientStreamMessage(
        agent_log=pb.AgentLog(
            message=message, computation_id=computation_id, level=level, timestamp=_now()
        )
    )


def computation_of(message: pb.ClientStreamMessage) -> str:
    kind = message.WhichOneof("message")
    if kind == "agent_event":
        return message.agent_event.computation_id
    if kind == "agent_log":
        return message.agent_log.computation_id
    if kind == "run_res":
        return message.run_res.computation_id
    return ""
