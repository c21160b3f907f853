"""`cocos-manager-cli`: a control plane's view of the Manager, for operators and demos.

`run` takes a manifest JSON file (the shape of ComputationRunReq, hashes as hex, base64 or
lists of numbers), or dataset and algorithm files that it hashes with SHA3-256 as the
original's test server did. `stop` stops a computation; `events` follows the stream;
`attestation-policy` prints the expected launch measurement document of a confidential VM.
`list` shows the computations the manager holds; `logs` a computation's console; `show`
everything about one of them; `pause` and `resume` freeze and thaw its guest.
`create-vm`, `remove-vm` and `cvm-info` speak today's upstream control plane (cvm.py).

Where the manager is and how to reach it: --address/-a, --ca, --cert, --key, or the variables
COCOS_MANAGER_ADDR, COCOS_MANAGER_CA, COCOS_MANAGER_CERT, COCOS_MANAGER_KEY (an option wins).
JSON output uses the proto's field names (snake_case), as grpcurl prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import grpc
from google.protobuf import json_format

from cocos_manager import __version__
from cocos_manager.cli import cvm
from cocos_manager.cli.output import (
    computation_table,
    console_line,
    explain_connection_failure,
    print_message,
    proto_json,
)
from cocos_manager.cli.request import CliError, request_from_files, request_from_manifest
from cocos_manager.cli.verbs import vm_report, watch_power_off
from cocos_manager.config import TlsConfigError, channel_credentials, memory_mib
from cocos_manager.events import MANAGER_SHUTDOWN
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc


def _channel(options: argparse.Namespace) -> grpc.aio.Channel:
    if options.ca or options.cert or options.key:
        try:
            credentials = channel_credentials(options.ca, options.cert, options.key)
        except TlsConfigError as error:
            raise CliError(str(error)) from None
        return grpc.aio.secure_channel(options.address, credentials)
    return grpc.aio.insecure_channel(options.address)


async def _run(options: argparse.Namespace) -> int:
    if options.manifest:
        request = request_from_manifest(options.manifest)
    elif options.algorithm and options.id:
        request = request_from_files(options)
    else:
        raise CliError("run: give --manifest FILE, or --id with --algorithm (and --dataset)")
    if options.ttl is not None:
        request.ttl = options.ttl
    if options.vcpus is not None:
        request.vcpus = options.vcpus
    if options.memory is not None:
        request.memory_mib = options.memory
    async with _channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).Run(request, timeout=options.timeout)
    print_message(response, options.json)
    return 0


async def _stop(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        stub = pb_grpc.ManagerServiceStub(channel)
        watch = None if options.force else await watch_power_off(stub, options.computation_id)
        try:
            await stub.Stop(
                pb.StopRequest(computation_id=options.computation_id, force=options.force),
                timeout=options.timeout,
            )
        finally:
            if watch is not None:
                watch.cancel()
    if not options.json:
        print(f"computation {options.computation_id} stopped")
    return 0


STREAM_ENDED = 3
"""Exit status of `events` when the manager ended the stream (it shuts down)."""


async def _pause(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        await pb_grpc.ManagerServiceStub(channel).Pause(
            pb.PauseRequest(computation_id=options.computation_id), timeout=options.timeout
        )
    if not options.json:
        print(f"computation {options.computation_id} paused")
    return 0


async def _resume(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        await pb_grpc.ManagerServiceStub(channel).Resume(
            pb.ResumeRequest(computation_id=options.computation_id), timeout=options.timeout
        )
    if not options.json:
        print(f"computation {options.computation_id} resumed")
    return 0


async def _show(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).Get(
            pb.GetRequest(computation_id=options.computation_id), timeout=options.timeout
        )
    if options.json:
        print(json_format.MessageToJson(response, indent=None, preserving_proto_field_name=True))
    else:
        print(vm_report(response, argv_lines=options.verbose))
    return 0


async def _events(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        request = pb.EventsRequest(computation_id=options.computation_id or "")
        if options.since is not None:
            request.since = options.since
        stream = pb_grpc.ManagerServiceStub(channel).Events(request)
        # The server sends the headers once the subscription is registered: from here on
        # nothing published is missed (a script may start its Run after this line).
        await stream.initial_metadata()
        if stream.done():  # refused (e.g. RESOURCE_EXHAUSTED): headers and status came at once
            async for _ in stream:  # raises the status, as any failed call does
                pass
        which = (
            f"computation {options.computation_id}"
            if options.computation_id
            else "every computation"
        )
        print(
            f"cocos-manager-cli: subscribed to the events of {which} at {options.address}",
            file=sys.stderr,
            flush=True,
        )
        count = 0
        last: pb.ClientStreamMessage | None = None
        last_seq = options.since
        async for message in stream:
            print_message(message, options.json)
            last = message
            if message.seq:  # 0: a notice of this stream (events-lost), not a published one
                last_seq = message.seq
            count += 1
            if options.count and count >= options.count:
                stream.cancel()
                return 0
    # Only the manager ends a stream, when it shuts down: that is no success for a follower.
    print(f"cocos-manager-cli: events: {stream_end(last, last_seq)}", file=sys.stderr)
    return STREAM_ENDED


def stream_end(last: pb.ClientStreamMessage | None, last_seq: int | None) -> str:
    """Why the stream ended (the manager's `manager-shutdown` notice, its last message, says
    which VMs it left running), and how to go on from where it ended."""
    event = last.agent_event if last is not None else None
    if event is not None and event.event_type == MANAGER_SHUTDOWN and event.status == "complete":
        left = json.loads(event.details or b"{}").get("left_running") or []
        words = "the manager shut down and ended the stream"
        words += f"; VMs left running: {', '.join(left)}" if left else "; no VM left running"
    else:
        words = "the manager ended the stream without saying why"
    if last_seq:
        words += f"; once it is back, resume with --since {last_seq}"
    return words


async def _attestation_policy(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).AttestationPolicy(
            pb.AttestationPolicyRequest(computation_id=options.computation_id),
            timeout=options.timeout,
        )
    sys.stdout.write(response.info.decode())
    return 0


# -- operator queries: list, logs ---------------------------------------------------------


async def _list(options: argparse.Namespace) -> int:
    async with _channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).List(
            pb.ListRequest(), timeout=options.timeout
        )
    if options.json:
        print(proto_json(response))
    elif response.computations:
        print(computation_table(response.computations))
    else:
        print("no computations")
    return 0


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
                print(proto_json(log), flush=True)
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 2**32:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _memory(text: str) -> int:
    """MiB, as ComputationRunReq.memory_mib; written as QEMU's -m sizes are (4096, 4G)."""
    try:
        value = memory_mib(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not 0 < value < 2**32:
        raise argparse.ArgumentTypeError(f"must be 1 MiB or more: {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or more: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Remembers which options take a value, in any subcommand (joined_values)."""

    value_options: ClassVar[set[str]] = set()

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs is None:
            _Parser.value_options.update(action.option_strings)
        return action


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _parser() -> _Parser:
    formatter = DefaultsHelpFormatter
    common = _Parser(add_help=False, formatter_class=formatter)
    common.add_argument(
        "--address",
        "-a",
        help=f"manager host:port; ${ADDRESS_VARIABLE} when not given (default: {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--ca",
        help="CA certificate (path or PEM) to verify the server; enables TLS; "
        f"${TLS_VARIABLES['ca']} when not given",
    )
    common.add_argument(
        "--cert",
        help=f"client certificate (path or PEM) for mutual TLS; ${TLS_VARIABLES['cert']} when not given",
    )
    common.add_argument(
        "--key",
        help=f"client private key (path or PEM) for mutual TLS; ${TLS_VARIABLES['key']} when not given",
    )
    common.add_argument("--timeout", type=float, default=300.0, help="seconds (run, stop)")
    common.add_argument("--json", action="store_true", help="print messages as JSON lines")

    parser = _Parser(
        prog="cocos-manager-cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    run.add_argument(
        "--vcpus", type=_positive, help="vCPUs of this VM (default: MANAGER_QEMU_SMP_COUNT)"
    )
    run.add_argument(
        "--memory",
        type=_memory,
        metavar="SIZE",
        help="memory of this VM: MiB, or with M, G (4G); default: MANAGER_QEMU_MEMORY_SIZE",
    )
    stop = sub.add_parser(
        "stop", parents=[common], help="stop a computation", formatter_class=formatter
    )
    stop.add_argument("computation_id", help="the id given to run")
    stop.add_argument(
        "--force",
        action="store_true",
        help="do not wait for the guest to power off (MANAGER_QEMU_POWERDOWN_GRACE): end QEMU "
        "at once; also cuts short a stop already waiting",
    )
    for verb, text in (
        ("pause", "freeze a running computation's guest (QMP stop)"),
        ("resume", "let a paused computation's guest run again (QMP cont)"),
    ):
        verb_parser = sub.add_parser(verb, parents=[common], help=text, formatter_class=formatter)
        verb_parser.add_argument("computation_id")
    show = sub.add_parser(
        "show",
        parents=[common],
        help="everything about one computation (also for a while after it ended)",
        formatter_class=formatter,
    )
    show.add_argument("computation_id")
    show.add_argument(
        "--verbose", "-v", action="store_true", help="QEMU's command line one argument a line"
    )
    events = sub.add_parser(
        "events",
        parents=[common],
        help="follow events until Ctrl-C (exit status 3 when the manager ends the stream: it "
        "shut down)",
        formatter_class=formatter,
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
    cvm.add_parsers(sub, common, formatter)
    return parser


COMMANDS = {
    "run": _run,
    "stop": _stop,
    "events": _events,
    "attestation-policy": _attestation_policy,
    "list": _list,
    "logs": _logs,
    "pause": _pause,
    "resume": _resume,
    "show": _show,
    **cvm.commands(_channel),
}


DEFAULT_ADDRESS = "localhost:7001"
ADDRESS_VARIABLE = "COCOS_MANAGER_ADDR"
TLS_VARIABLES = {"ca": "COCOS_MANAGER_CA", "cert": "COCOS_MANAGER_CERT", "key": "COCOS_MANAGER_KEY"}


def from_environment(options: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """An option left out takes its COCOS_MANAGER_* variable (an empty one counts as unset),
    and `address_source` says where the address came from, for a failed connection's hint."""
    if options.address:
        options.address_source = "--address"
    elif environ.get(ADDRESS_VARIABLE):
        options.address, options.address_source = environ[ADDRESS_VARIABLE], ADDRESS_VARIABLE
    else:
        options.address, options.address_source = DEFAULT_ADDRESS, "the default"
    for option, variable in TLS_VARIABLES.items():
        if not getattr(options, option) and environ.get(variable):
            setattr(options, option, environ[variable])


_NEGATIVE = re.compile(r"-\.?[0-9]")  # -5s, -1, -.5: a negative value, never an option


def joined_values(argv: Sequence[str], parser: _Parser) -> list[str]:
    """`--ttl -5s` as `--ttl=-5s`: argparse takes a value like -5s (not a plain number) for
    an option and answers "expected one argument"; joined, the negative value reaches its
    check, which says what is wrong with it. No option of this CLI starts with a digit."""
    takes_value = parser.value_options
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in takes_value and following is not None and _NEGATIVE.match(following):
            out.append(f"{arg}={following}" if arg.startswith("--") else f"{arg}{following}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(joined_values(sys.argv[1:] if argv is None else argv, parser))
    from_environment(options, os.environ)
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
