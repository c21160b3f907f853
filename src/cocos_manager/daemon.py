"""The daemon's life: configure, serve until SIGTERM/SIGINT, shut down cleanly."""

from __future__ import annotations

import asyncio
import signal

from cocos_manager.logging import configure_logging, get_logger
from cocos_manager.qemu_argv import qemu_args, resolve_executable, shell_line
from cocos_manager.settings import Settings


async def run_daemon(settings: Settings) -> int:
    configure_logging(settings.service.LOG_LEVEL)
    log = get_logger()
    executable = resolve_executable(settings.qemu)
    log.info(shell_line(executable.command(qemu_args(settings.qemu))))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("manager stopped")
    return 0
