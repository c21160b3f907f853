"""Checking a Run request and building the manifest JSON the agent reads.

The byte-exact format is docs/contracts.md, "The manifest".

The JSON is byte-compatible with what the Go original's encoding/json produced: same key
order, the same keys left out when empty, hashes as arrays of 32 numbers, compact, and
HTML-sensitive characters escaped as Go escapes them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from cocos_manager.config import DurationRangeError, Settings, parse_go_duration
from cocos_manager.errors import InvalidArgumentError
from cocos_manager.proto import manager_pb2 as pb

HASH_SIZE = 32  # SHA3-256
MAX_ID_LENGTH = 256
# Go's time.Duration is an int64 of nanoseconds: ParseDuration refuses anything longer.
MAX_TTL_SECONDS = (2**63 - 1) / 1e9


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
    """Refuses what the original crashed on or silently passed to the agent."""
    if not request.id:
        raise InvalidArgumentError("id: a computation id is required")
    if len(request.id) > MAX_ID_LENGTH:
        raise InvalidArgumentError(f"id: at most {MAX_ID_LENGTH} characters")
    # C0, DEL and C1 (U+009B is a one-character CSI): ids are printed on terminals.
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in request.id):
        raise InvalidArgumentError("id: control characters are not allowed")
    if not request.HasField("algorithm"):
        raise InvalidArgumentError("algorithm: required")
    if not request.HasField("agent_config"):
        raise InvalidArgumentError("agent_config: required")
    _check_agent_port(request.agent_config.port)
    _check_hash("algorithm.hash", request.algorithm.hash)
    for index, dataset in enumerate(request.datasets):
        _check_hash(f"datasets[{index}].hash", dataset.hash)
    if request.ttl:
        parse_ttl(request.ttl)


def parse_ttl(text: str) -> float:
    """Seconds of a Run's `ttl` (a Go duration). Checked with the rest of the request, before
    anything is reserved or started: upstream started the VM first and leaked it on a bad TTL."""
    try:
        seconds = parse_go_duration(text)
    except DurationRangeError:
        raise InvalidArgumentError(
            f"ttl: {text[:64]!r} is out of range (at most 2562047h)"
        ) from None
    except ValueError:
        raise InvalidArgumentError(
            f"ttl: {text[:64]!r} is not a duration (Go syntax, such as 20s, 90m or 1h30m)"
        ) from None
    if seconds <= 0:
        raise InvalidArgumentError(f"ttl: {text[:64]!r} must be positive (empty = no TTL)")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidArgumentError(f"ttl: {text[:64]!r} is out of range (at most 2562047h)")
    return seconds


def effective_ttl(request: pb.ComputationRunReq, settings: Settings) -> float | None:
    """The TTL a Run gets in seconds: its own `ttl`, else MANAGER_DEFAULT_TTL; None = no TTL.
    The request must have passed validate_run_request."""
    if request.ttl:
        return parse_ttl(request.ttl)
    return settings.service.DEFAULT_TTL


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
        "attested_tls": config.attested_tls,  # the original dropped it
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


_CHUNK = 256


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _dumps_list(items: list[Any]) -> str:
    """The same text as _dumps(items), made a chunk at a time: json.dumps holds the GIL for
    the whole call (230 ms for 60,000 datasets), which would stall the event loop even from a
    worker thread; between chunks the GIL is given back."""
    if len(items) <= _CHUNK:
        return _dumps(items)
    chunks = (_dumps(items[i : i + _CHUNK])[1:-1] for i in range(0, len(items), _CHUNK))
    return "[" + ",".join(chunks) + "]"


def manifest_json(request: pb.ComputationRunReq) -> bytes:
    fields = (
        f"{_dumps(key)}:{_dumps_list(value) if isinstance(value, list) else _dumps(value)}"
        for key, value in build_manifest(request).items()
    )
    text = "{" + ",".join(fields) + "}"
    return text.translate(_GO_ESCAPE_TABLE).encode()


OFF_LOOP_ITEMS = 1_000
"""Datasets plus result consumers from which checking and building move to a worker thread.
Below it the work takes well under a millisecond, less than the hop to a thread costs."""


def checked_manifest_json(request: pb.ComputationRunReq) -> bytes:
    validate_run_request(request)
    return manifest_json(request)


async def validated_manifest(request: pb.ComputationRunReq) -> bytes:
    """validate_run_request then manifest_json, never stalling the event loop.

    A Run with 60,000 datasets takes a few hundred milliseconds of Python to check and to
    encode; done on the loop, every other RPC (a health check, a Stop, Events) and every VM's
    supervision would wait that long. Big requests run in a worker thread; the loop keeps
    turning (the thread gives the GIL back every few milliseconds). Raises what
    validate_run_request raises.
    """
    if len(request.datasets) + len(request.result_consumers) < OFF_LOOP_ITEMS:
        return checked_manifest_json(request)
    return await asyncio.to_thread(checked_manifest_json, request)
