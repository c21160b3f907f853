"""Checking a Run request and building the manifest JSON the agent reads (SPEC section 4).

The JSON is byte-compatible with what the Go original's encoding/json produced: same key
order, the same keys left out when empty, hashes as arrays of 32 numbers, compact, and
HTML-sensitive characters escaped as Go escapes them.
"""

from __future__ import annotations

import json
from typing import Any

from cocos_manager.api import manager_pb2 as pb
from cocos_manager.errors import InvalidArgumentError

HASH_SIZE = 32  # SHA3-256
MAX_ID_LENGTH = 256


def _check_hash(field: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise InvalidArgumentError(
            f"{field}: a SHA3-256 hash is {HASH_SIZE} bytes, got {len(value)}"
        )


def _check_agent_port(port: str) -> None:
    """Empty = the agent's own default. The host forward always targets
    MANAGER_QEMU_GUEST_FWD_AGENT, whatever port the agent is told to listen on."""
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise InvalidArgumentError(
            f"agent_config.port: {port[:20]!r} is not a port number (1-65535)"
        )


def validate_run_request(request: pb.ComputationRunReq) -> None:
    """Refuses what the original crashed on or silently passed to the agent (SPEC defect 4)."""
    if not request.id:
        raise InvalidArgumentError("id: a computation id is required")
    if len(request.id) > MAX_ID_LENGTH:
        raise InvalidArgumentError(f"id: at most {MAX_ID_LENGTH} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in request.id):
        raise InvalidArgumentError("id: control characters are not allowed")
    if not request.HasField("algorithm"):
        raise InvalidArgumentError("algorithm: required")
    if not request.HasField("agent_config"):
        raise InvalidArgumentError("agent_config: required")
    _check_agent_port(request.agent_config.port)
    _check_hash("algorithm.hash", request.algorithm.hash)
    for index, dataset in enumerate(request.datasets):
        _check_hash(f"datasets[{index}].hash", dataset.hash)


def _resource(item: pb.Dataset | pb.Algorithm) -> dict[str, Any]:
    out: dict[str, Any] = {"hash": list(item.hash)}
    if item.provider:
        out["provider"] = item.provider
    if item.id:
        out["id"] = item.id
    return out


def build_manifest(request: pb.ComputationRunReq) -> dict[str, Any]:
    manifest: dict[str, Any] = {}
    for key in ("id", "name", "description"):
        if value := getattr(request, key):
            manifest[key] = value
    if request.datasets:
        manifest["datasets"] = [_resource(d) for d in request.datasets]
    manifest["algorithms"] = _resource(request.algorithm)
    if request.result_consumers:
        manifest["result_consumers"] = list(request.result_consumers)
    config = request.agent_config
    manifest["agent_config"] = {
        "log_level": config.log_level,
        "host": config.host,
        "port": config.port,
        "cert_file": config.cert_file,
        "server_key": config.key_file,
        "server_ca_file": config.server_ca_file,
        "client_ca_file": config.client_ca_file,
        "attested_tls": config.attested_tls,  # the original dropped it (SPEC defect 5)
    }
    return manifest


_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_ESCAPE_TABLE = str.maketrans(_GO_ESCAPES)


def manifest_json(request: pb.ComputationRunReq) -> bytes:
    text = json.dumps(build_manifest(request), separators=(",", ":"), ensure_ascii=False)
    return text.translate(_GO_ESCAPE_TABLE).encode()
