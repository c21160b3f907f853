"""`cocos-manager-cli`: a control plane's view of the Manager, for operators and demos.

`run` takes a manifest JSON file (the shape of ComputationRunReq, hashes as hex, base64 or
lists of numbers), or dataset and algorithm files that it hashes with SHA3-256 as the
original's test server did. `stop` stops a computation; `events` follows the stream;
`attestation-policy` prints the expected launch measurement document of a confidential VM.
`list` shows the computations the manager holds; `logs` a computation's console.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.api import manager_pb2 as pb
from cocos_manager.api import manager_pb2_grpc as pb_grpc
from cocos_manager.tls import TlsConfigError, channel_credentials


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


def _channel(options: argparse.Namespace) -> grpc.aio.Channel:
    if options.ca or options.cert or options.key:
        try:
            credentials = channel_credentials(options.ca, options.cert, options.key)
        except TlsConfigError as error:
            raise CliError(str(error)) from None
        return grpc.aio.secure_channel(options.address, credentials)
    return grpc.aio.insecure_channel(options.address)


def _decoded_details(details: bytes) -> Any:
    """An event's details are JSON bytes (base64 in protobuf JSON): shown as what they say."""
    text = details.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _print(message: Any, as_json: bool) -> None:
    if as_json:
        doc = json_format.MessageToDict(message)
        if isinstance(message, pb.ClientStreamMessage) and message.agent_event.details:
            doc["agentEvent"]["details"] = _decoded_details(message.agent_event.details)
        print(json.dumps(doc, separators=(",", ":")), flush=True)
    else:
        print(_describe(message), flush=True)


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


def _describe(message: Any) -> str:
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
    return json_format.MessageToJson(message, indent=None)


async def _run(options: argparse.Namespace) -> int:
    if options.manifest:
        request = request_from_manifest(options.manifest)
    elif options.algorithm and options.id:
        request = request_from_files(options)
    else:
        raise CliError("run: give --manifest FILE, or --id with --algorithm (and --dataset)")
    if options.ttl is not None:
        request.ttl = options.ttl
    async with _channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).Run(request, timeout=options.timeout)
    _print(response, options.json)
    return 0


async def _stop(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        await pb_grpc.ManagerServiceStub(channel).Stop(
            pb.StopRequest(computation_id=options.computation_id), timeout=options.timeout
        )
    if not options.json:
        print(f"computation {options.computation_id} stopped")
    return 0


async def _events(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        request = pb.EventsRequest(computation_id=options.computation_id or "")
        if options.since is not None:
            request.since = options.since
        stream = pb_grpc.ManagerServiceStub(channel).Events(request)
        count = 0
        async for message in stream:
            _print(message, options.json)
            count += 1
            if options.count and count >= options.count:
                stream.cancel()
                break
    return 0


async def _attestation_policy(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).AttestationPolicy(
            pb.AttestationPolicyRequest(computation_id=options.computation_id),
            timeout=options.timeout,
        )
    sys.stdout.write(response.info.decode())
    return 0


# -- operator queries: list, logs ---------------------------------------------------------


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
                str(c.guest_cid),
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


async def _list(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).List(
            pb.ListRequest(), timeout=options.timeout
        )
    if options.json:
        print(json_format.MessageToJson(response, indent=None))
    elif response.computations:
        print(computation_table(response.computations))
    else:
        print("no computations")
    return 0


def console_line(log: pb.AgentLog) -> str:
    """The guest's console is guest-controlled: made printable as `events` makes it."""
    return printable(f"{_time(log.timestamp, 'milliseconds')} {log.level:<5} {log.message}")


async def _logs(options: argparse.Namespace) -> int:
    request = pb.LogsRequest(
        computation_id=options.computation_id, tail=options.lines, follow=options.follow
    )
    async with _channel(options) as channel:
        stream = pb_grpc.ManagerServiceStub(channel).Logs(
            request, timeout=None if options.follow else options.timeout
        )
        async for log in stream:
            if options.json:
                print(json_format.MessageToJson(log, indent=None), flush=True)
            else:
                print(console_line(log), flush=True)
    return 0


def _seq(text: str) -> int:
    """EventsRequest.since is a uint64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be 0 or more (a sequence number): {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or more: {text!r}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    formatter = DefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False, formatter_class=formatter)
    common.add_argument("--address", "-a", default="localhost:7001", help="manager host:port")
    common.add_argument(
        "--ca", help="CA certificate (path or PEM) to verify the server; enables TLS"
    )
    common.add_argument("--cert", help="client certificate (path or PEM) for mutual TLS")
    common.add_argument("--key", help="client private key (path or PEM) for mutual TLS")
    common.add_argument("--timeout", type=float, default=300.0, help="seconds (run, stop)")
    common.add_argument("--json", action="store_true", help="print messages as JSON lines")

    parser = argparse.ArgumentParser(
        prog="cocos-manager-cli", description=__doc__, formatter_class=formatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", parents=[common], help="run a computation", formatter_class=formatter
    )
    run.add_argument("--manifest", "-m", help="ComputationRunReq as JSON")
    run.add_argument("--id", help="computation id (with --algorithm)")
    run.add_argument("--name", help="computation name (default: the id)")
    run.add_argument("--description", help="computation description")
    run.add_argument("--algorithm", help="algorithm file, hashed with SHA3-256")
    run.add_argument("--dataset", action="append", default=[], help="dataset file (repeatable)")
    run.add_argument("--result-consumer", action="append", help="result consumer (repeatable)")
    run.add_argument(
        "--agent-port",
        default="7002",
        help="agent_config.port: where the agent listens in the guest (the host forward "
        "always targets the daemon's MANAGER_QEMU_GUEST_FWD_AGENT)",
    )
    run.add_argument("--agent-log-level", default="info", help="agent_config.log_level")
    run.add_argument("--attested-tls", action="store_true", help="agent_config.attested_tls")
    run.add_argument(
        "--ttl", help="stop the VM this long after it runs (Go duration: 20s, 90m, 1h30m)"
    )
    stop = sub.add_parser(
        "stop", parents=[common], help="stop a computation", formatter_class=formatter
    )
    stop.add_argument("computation_id", help="the id given to run")
    events = sub.add_parser(
        "events", parents=[common], help="follow events until Ctrl-C", formatter_class=formatter
    )
    events.add_argument("computation_id", nargs="?", help="only this computation")
    events.add_argument(
        "--count", type=_non_negative, default=0, help="stop after this many messages (0: never)"
    )
    events.add_argument(
        "--since",
        type=_seq,
        metavar="SEQ",
        help="first replay the retained messages numbered after SEQ (0: all retained); "
        "text lines start with #SEQ",
    )
    policy = sub.add_parser(
        "attestation-policy",
        parents=[common],
        help="print the JSON a verifier checks the computation's attestation report with",
    )
    policy.add_argument("computation_id")
    sub.add_parser("list", parents=[common], help="the computations the manager holds")
    logs = sub.add_parser("logs", parents=[common], help="a computation's console (QEMU, agent)")
    logs.add_argument("computation_id")
    logs.add_argument(
        "--lines", "-n", type=_non_negative, default=0, help="the last N lines (0 = all kept)"
    )
    logs.add_argument(
        "--follow", "-f", action="store_true", help="then new lines until the VM ends or Ctrl-C"
    )
    return parser


COMMANDS = {
    "run": _run,
    "stop": _stop,
    "events": _events,
    "attestation-policy": _attestation_policy,
    "list": _list,
    "logs": _logs,
}


def explain_connection_failure(error: grpc.aio.AioRpcError, options: argparse.Namespace) -> str:
    """What a failed connection likely means, and what to pass; "" when it is not one.

    gRPC reports three different TLS mistakes the same way ("Socket closed": the server hung
    up during the handshake), so what the client sent tells them apart.
    """
    if error.code() is not grpc.StatusCode.UNAVAILABLE:
        return ""
    details = error.details() or ""
    tls = bool(options.ca or options.cert or options.key)
    if "WRONG_VERSION_NUMBER" in details or "HTTP_REQUEST" in details:
        return "the server speaks plaintext, not TLS: leave out --ca, --cert and --key"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            "the server's certificate is not signed by the CA you trust: pass the CA that "
            "signed it with --ca (without --ca the system's trust store is used)"
        )
    if "Socket closed" not in details and "Connection reset" not in details:
        return ""
    if not tls:
        return (
            "the server closed the connection during set-up: it likely speaks TLS; pass "
            "--ca CA.pem (and --cert/--key if it requires client certificates)"
        )
    if not options.cert:
        return (
            "the server closed the connection during the TLS handshake: it likely requires a "
            "client certificate (mutual TLS); pass --cert and --key"
        )
    return (
        "the server closed the connection during the TLS handshake: it likely does not accept "
        "your certificate (--cert must be signed by the CA in the server's "
        "MANAGER_GRPC_CLIENT_CA_CERTS)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    try:
        return asyncio.run(COMMANDS[options.command](options))
    except CliError as error:
        print(f"cocos-manager-cli: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"cocos-manager-cli: {error}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        print(f"cocos-manager-cli: {error.code().name}: {error.details()}", file=sys.stderr)
        if hint := explain_connection_failure(error, options):
            print(f"cocos-manager-cli: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
