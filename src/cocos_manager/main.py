"""Entry point of the `cocos-manager` console script.

With no arguments it runs the daemon; `print-qemu-cmd` prints the base QEMU command line.
Bad settings end the process with one line on stderr naming the variable, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from cocos_manager.confidential import ConfidentialConfigError, check_confidential_launch
from cocos_manager.qemu_argv import QemuNotFoundError, qemu_args, resolve_executable, shell_line
from cocos_manager.settings import Settings, SettingsError, load_settings


def _fail(message: str) -> int:
    print(f"cocos-manager: {message}", file=sys.stderr)
    return 2


def _print_qemu_cmd(settings: Settings, as_json: bool) -> int:
    executable = resolve_executable(settings.qemu)
    args = [*executable.prefix, *qemu_args(settings.qemu)]
    if as_json:
        print(json.dumps({"exe": executable.exe, "args": args}))
    else:
        print(shell_line([executable.exe, *args]))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cocos-manager",
        description="Cocos Manager daemon. Configured from MANAGER_* environment variables.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the daemon (the default)")
    qemu = sub.add_parser("print-qemu-cmd", help="print the base QEMU command line and exit")
    qemu.add_argument("--json", action="store_true", help='print {"exe": ..., "args": [...]}')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    try:
        settings = load_settings()
        check_confidential_launch(settings.qemu)  # SNP/TDX asked for and QEMU lacks it: refuse
        if options.command == "print-qemu-cmd":
            return _print_qemu_cmd(settings, options.json)
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
