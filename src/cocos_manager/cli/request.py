"""The Run request `cocos-manager-cli run` sends: from a manifest JSON file (hashes as hex,
base64 or lists of numbers), or from dataset and algorithm files it hashes with SHA3-256 as
the original's test server did; and the error for what the operator gave wrong."""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from cocos_manager.proto import manager_pb2 as pb


class CliError(Exception):
    pass


def sha3_file(path: str) -> bytes:
    digest = hashlib.sha3_256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


_HEX = frozenset("0123456789abcdefABCDEF")
HASH_SIZE = 32


def _hash_field(value: Any, where: str) -> str:
    """Hex, base64 or a list of byte values, decoded first and then measured: a hash that
    decodes but has the wrong length is reported with its length. Protobuf JSON wants base64."""
    if isinstance(value, list):
        try:
            raw = bytes(value)
        except (TypeError, ValueError):
            raise CliError(f"{where}: a list must hold numbers 0-255") from None
        kind = "a list"
    elif isinstance(value, str):
        text = value.strip()
        try:
            if text and len(text) % 2 == 0 and set(text) <= _HEX:
                raw, kind = bytes.fromhex(text), "hex"
            else:
                raw, kind = base64.b64decode(text, validate=True), "base64"
        except (ValueError, binascii.Error):
            raise CliError(
                f"{where}: {value[:80]!r} is not hex, base64 or a list of numbers"
            ) from None
    else:
        raise CliError(f"{where}: not hex, base64 or a list of numbers")
    if len(raw) != HASH_SIZE:
        raise CliError(
            f"{where}: {len(raw)} bytes (read as {kind}); a SHA3-256 hash is {HASH_SIZE} bytes "
            f"({HASH_SIZE * 2} hex digits)"
        )
    return base64.b64encode(raw).decode()


def request_from_manifest(path: str) -> pb.ComputationRunReq:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CliError(f"{path}: {error}") from None
    if not isinstance(doc, dict):
        raise CliError(f"{path}: expected a JSON object (a ComputationRunReq)")
    if "algorithms" in doc and "algorithm" not in doc:  # the agent manifest's spelling
        doc["algorithm"] = doc.pop("algorithms")
    if isinstance(doc.get("algorithm"), dict) and "hash" in doc["algorithm"]:
        doc["algorithm"]["hash"] = _hash_field(doc["algorithm"]["hash"], "algorithm.hash")
    datasets = doc.get("datasets", [])
    for i, dataset in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(dataset, dict) and "hash" in dataset:
            dataset["hash"] = _hash_field(dataset["hash"], f"datasets[{i}].hash")
    config = doc.get("agent_config")
    if isinstance(config, dict) and "server_key" in config and "key_file" not in config:
        config["key_file"] = config.pop("server_key")
    try:
        return json_format.ParseDict(doc, pb.ComputationRunReq())
    except (json_format.ParseError, TypeError, ValueError) as error:
        raise CliError(f"{path}: {error}") from None


def request_from_files(options: argparse.Namespace) -> pb.ComputationRunReq:
    return pb.ComputationRunReq(
        id=options.id,
        name=options.name or options.id,
        description=options.description or "",
        datasets=[
            pb.Dataset(provider="cli", id=Path(p).name, hash=sha3_file(p)) for p in options.dataset
        ],
        algorithm=pb.Algorithm(
            provider="cli", id=Path(options.algorithm).name, hash=sha3_file(options.algorithm)
        ),
        result_consumers=options.result_consumer or [],
        agent_config=pb.AgentConfig(
            port=options.agent_port,
            log_level=options.agent_log_level,
            attested_tls=options.attested_tls,
        ),
    )
