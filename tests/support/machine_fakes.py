"""A stand-in for QemuProcess whose every await is a gate the test opens, so a Machine can be
driven through each await point (and cancelled at each) in milliseconds, with no process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocos_manager.errors import QemuExitedError
from cocos_manager.qemu.spawn import ExitInfo

GATES = ("attach_output", "wait_ready", "terminate")


@dataclass
class Gate:
    """`entered` is set when the Machine reaches the await; it goes on once `opened` is set."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None

    async def pass_(self) -> None:
        self.entered.set()
        await self.opened.wait()
        if self.error is not None:
            raise self.error


class FakeOutput:
    async def keeper_gone(self, timeout: float = 1.0) -> None:
        return None


class FakeProcess:
    pids = iter(range(900_000, 1_000_000))

    def __init__(self, argv: Sequence[str], gates: dict[str, Gate]) -> None:
        self.pid = next(self.pids)
        self.argv = list(argv)
        self.start_time, self.cmdline = 1, list(argv)
        self.exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self.gates = gates
        self.signals: list[str] = []
        self.monitor = None
        self.wrapped = False
        self.output = FakeOutput()

    async def attach_output(self) -> None:
        await self.gates["attach_output"].pass_()

    async def wait_ready(self, qmp_path: Path, timeout: float) -> None:
        await self.gates["wait_ready"].pass_()

    def exit(self, returncode: int = 0) -> None:
        if not self.exited.done():
            self.exited.set_result(ExitInfo(returncode))

    async def exited_at_start(self, during: str = "during start-up") -> QemuExitedError:
        return QemuExitedError(
            f"QEMU exited {during}", exit="exit status 1", stderr=[], conflict=None
        )

    def close_pipes(self) -> None:
        self.signals.append("close_pipes")

    def kill_now(self) -> None:
        self.signals.append("SIGKILL")

    async def terminate(self, timeout: float) -> ExitInfo:
        self.signals.append(f"terminate({timeout:g})")
        await self.gates["terminate"].pass_()
        self.exit(-9)
        return self.exited.result()

    async def wait_output(self, timeout: float = 1.0, *, keeper: bool = True) -> None:
        return None

    def close_console(self) -> None:
        return None

    async def end_outlived(self) -> bool:
        return False

    def tail(self, stream: str | None = None) -> list[str]:
        return []


class FakeLauncher:
    """The Machine's `launch`: records each process it starts; every gate open unless closed."""

    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self.gates = {name: Gate() for name in GATES}
        for gate in self.gates.values():
            gate.opened.set()

    def close(self, name: str) -> Gate:
        gate = self.gates[name] = Gate()
        return gate

    async def __call__(self, argv: Sequence[str], **_: Any) -> FakeProcess:
        process = FakeProcess(argv, self.gates)
        self.processes.append(process)
        return process
