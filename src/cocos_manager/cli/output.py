"""What `cocos-manager-cli` prints: stream messages as text or JSON lines (guest text made safe
for a terminal), the computation table, console lines, and what a failed connection means."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.config import CLI, likely_cause
from cocos_manager.proto import manager_pb2 as pb


def _decoded_details(details: bytes) -> Any:
    """An event's details are JSON bytes (base64 in protobuf JSON): shown as what they say."""
    text = details.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def proto_json(message: Any) -> str:
    """One line of protobuf JSON with the proto's own field names (snake_case), as grpcurl
    prints them: the one convention for every JSON this project prints."""
    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True),
        separators=(",", ":"),
    )


def print_message(message: Any, as_json: bool) -> None:
    if as_json:
        doc = json_format.MessageToDict(message, preserving_proto_field_name=True)
        if isinstance(message, pb.ClientStreamMessage) and message.agent_event.details:
            doc["agent_event"]["details"] = _decoded_details(message.agent_event.details)
        print(json.dumps(doc, separators=(",", ":")), flush=True)
    else:
        print(describe(message), flush=True)


# Terminal escape sequences: CSI (ESC [ ... final, or the C1 byte 0x9b), OSC/DCS/APC/PM/SOS
# strings up to BEL or ST, and the two-byte ESC forms (charset selection, keypad modes...).
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]P_^X]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)"
    r"|\x1b[ -/]*[0-~]?",
    re.DOTALL,
)
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Guest-controlled text made safe for a terminal: escape sequences removed (a guest must
    not retitle, recolour or clear the operator's terminal, nor hide lines), other control
    characters shown as \\xNN so one message stays on one line and nothing is invisible."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", _ESCAPES.sub("", text))


def describe(message: Any) -> str:
    if isinstance(message, pb.ClientStreamMessage):
        return f"#{message.seq} {_describe_stream_message(message)}"
    if isinstance(message, pb.RunResponse):
        return f"computation {message.computation_id} runs; agent port {message.agent_port}"
    return str(message)


def _describe_stream_message(message: pb.ClientStreamMessage) -> str:
    kind = message.WhichOneof("message")
    if kind == "agent_event":
        e = message.agent_event
        decoded = _decoded_details(e.details)
        details = (
            ""
            if not e.details
            else f" {decoded}"
            if isinstance(decoded, str)  # not JSON: shown as the text it is
            else f" {json.dumps(decoded, separators=(',', ':'))}"
        )
        return printable(
            f"[{e.computation_id}] event {e.originator}/{e.event_type}: {e.status}{details}"
        )
    if kind == "agent_log":
        log = message.agent_log
        return printable(f"[{log.computation_id}] log {log.level}: {log.message}")
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)


def _time(stamp: Timestamp, timespec: str = "seconds") -> str:
    """UTC, ISO 8601 with a Z: unambiguous whichever host the operator reads it on."""
    moment = datetime.fromtimestamp(stamp.ToNanoseconds() / 1e9, UTC)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def computation_table(computations: Sequence[pb.ComputationInfo]) -> str:
    """Aligned columns, one computation per line; times in UTC."""
    header = ("ID", "STATE", "PID", "AGENT PORT", "CID", "VNC", "STARTED", "EXPIRES", "ADOPTED")
    rows = [header]
    for c in computations:
        rows.append(
            (
                c.computation_id,
                c.state,
                str(c.pid) if c.pid else "-",
                c.agent_port,
                str(c.guest_cid) if c.guest_cid else "-",  # 0: no vsock device (fw_cfg)
                f":{c.vnc_display}",
                _time(c.started_at) if c.HasField("started_at") else "-",
                _time(c.expires_at) if c.HasField("expires_at") else "-",
                "yes" if c.adopted else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def console_line(log: pb.AgentLog) -> str:
    """The guest's console is guest-controlled: made printable as `events` makes it."""
    return printable(f"{_time(log.timestamp, 'milliseconds')} {log.level:<5} {log.message}")


def explain_connection_failure(error: grpc.aio.AioRpcError, options: argparse.Namespace) -> str:
    """What a failed connection likely means, and what to pass; "" when it is not one."""
    if error.code() is not grpc.StatusCode.UNAVAILABLE:
        return ""
    details = error.details() or ""
    tls = bool(options.ca or options.cert or options.key)
    cause = likely_cause(details, tls=tls, client_certificate=bool(options.cert), words=CLI)
    if cause:
        return cause
    source = getattr(options, "address_source", "--address")
    where = f"{options.address} (from {source})"
    change = (
        "point the CLI at the manager with --address HOST:PORT or COCOS_MANAGER_ADDR (the "
        "daemon listens on MANAGER_GRPC_HOST:MANAGER_GRPC_PORT, port 7001 by default)"
    )
    if "Connection refused" in details:
        return f"nothing accepts connections at {where}: is the daemon running? Or {change}"
    if "DNS resolution failed" in details or "Name or service not known" in details:
        return f"cannot resolve the host of {where}: {change}"
    return ""
