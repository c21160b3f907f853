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
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import grpc

from cocos_manager import __version__
from cocos_manager.cli import calls, cvm
from cocos_manager.cli.output import explain_connection_failure
from cocos_manager.cli.request import CliError
from cocos_manager.config import memory_mib


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
    "run": calls.run,
    "stop": calls.stop,
    "events": calls.events,
    "attestation-policy": calls.attestation_policy,
    "list": calls.list_computations,
    "logs": calls.logs,
    "pause": calls.pause,
    "resume": calls.resume,
    "show": calls.show,
    **cvm.COMMANDS,
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
