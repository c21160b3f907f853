"""Entry point of the `cocos-manager` console script.

With no arguments it runs the daemon; `print-qemu-cmd` prints the base QEMU command line;
`check` tells whether a Run can work on this host with these settings. Bad settings end the
process with one line on stderr naming the variable, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.config import Settings


def _fail(message: str) -> int:
    print(f"cocos-manager: {message}", file=sys.stderr)
    return 2


def _print_qemu_cmd(settings: Settings, as_json: bool, original: bool) -> int:
    import json

    from cocos_manager.qemu import effective_base_args, qemu_args, resolve_executable, shell_line

    executable = resolve_executable(settings.qemu)
    base = qemu_args(settings.qemu) if original else effective_base_args(settings.qemu)
    args = [*executable.prefix, *base]
    if as_json:
        print(json.dumps({"exe": executable.exe, "args": args}))
    else:
        print(shell_line([executable.exe, *args]))
    return 0


def _check(settings: Settings, as_json: bool, verbose: bool) -> int:
    from cocos_manager.check import run_checks
    from cocos_manager.host import exit_code, hidden_note, render

    checks = run_checks(settings)
    print(render(checks, as_json, verbose))
    if not as_json and (note := hidden_note(checks, verbose)):
        print(f"cocos-manager check: {note}", file=sys.stderr)
    return exit_code(checks)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cocos-manager",
        description="Cocos Manager daemon. Configured from MANAGER_* environment variables.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the daemon (the default)")
    qemu = sub.add_parser(
        "print-qemu-cmd",
        help="print the base QEMU command line a VM gets and exit",
        description="The base QEMU command line as a VM gets it (per VM: uuid names, a free "
        "host port, guest CID and VNC display, and the manager's QMP monitor are added).",
    )
    qemu.add_argument("--json", action="store_true", help='print {"exe": ..., "args": [...]}')
    qemu.add_argument(
        "--original",
        action="store_true",
        help="the original's base line, element for element (always with vhost-vsock, no -fw_cfg)",
    )
    check = sub.add_parser(
        "check",
        help="check this host against the settings; exit 1 when a Run cannot work",
        description="One line per probe: pass, warn or fail, with what to do. Probes of "
        "features the settings do not ask for (SEV on a TCG host, TDX on AMD) are info lines, "
        "shown with --verbose.",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {name, status, detail} (info lines included)",
    )
    check.add_argument("--verbose", "-v", action="store_true", help="also show the info lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # The start-up makes about 80,000 objects the collector tracks, nearly all living as long
    # as the process (modules, classes, pydantic's schemas): the collector's passes over them
    # while they are made found next to nothing (under 1,000 unreachable) and were a sixth of
    # its CPU. It runs again once the daemon is built (daemon.py, `run_daemon`), with what
    # start-up made frozen out of its passes.
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    # Imported here, with the collector held: they are most of the start-up.
    from cocos_manager.confidential import (
        ConfidentialConfigError,
        check_confidential_launch,
        check_settings,
    )
    from cocos_manager.config import SettingsError, load_settings
    from cocos_manager.qemu import QemuNotFoundError

    options = _parser().parse_args(argv)
    try:
        settings = load_settings()
        if options.command == "check":
            # Impossible combinations stop it; what QEMU or the host lacks is its report.
            check_settings(settings.qemu)
            return _check(settings, options.json, options.verbose)
        check_confidential_launch(settings.qemu)  # SNP/TDX asked for and QEMU lacks it: refuse
        if options.command == "print-qemu-cmd":
            return _print_qemu_cmd(settings, options.json, options.original)
        from cocos_manager.telemetry import capture_grpc_core_log

        capture_grpc_core_log()
        import asyncio

        from cocos_manager.daemon import StartupError, run_daemon

        try:
            return asyncio.run(run_daemon(settings))
        except StartupError as error:
            return _fail(str(error))
    except (SettingsError, QemuNotFoundError, ConfidentialConfigError) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
