"""The stand-in QEMU speaks QMP as real QEMU does, checked side by side with
`qemu-system-x86_64 -machine none` (no guest, a fraction of a second): commands are refused
until capabilities are negotiated, and the monitor serves one client at a time. Tests that
pass against the stand-in then hold against QEMU's monitor too."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocos_manager.qemu.qmp import qmp_args, qmp_listener
from tests.support.harness import FAKE_QEMU
from tests.support.waiting import GUARD, unavailable

REAL = "qemu-system-x86_64"


@pytest.fixture(params=["stand-in", "real"])
def monitor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A QEMU with the manager's own monitor: a listening socket handed over as an fd."""
    path = tmp_path / "qmp.sock"
    listener = qmp_listener(path)
    if request.param == "real":
        exe = shutil.which(REAL)
        if exe is None:
            unavailable(f"{REAL} is not installed (make install installs it)")
        argv = [exe, "-machine", "none", "-nodefaults", "-display", "none"]
    else:
        argv = [sys.executable, str(FAKE_QEMU)]
    process = subprocess.Popen(
        [*argv, *qmp_args(listener)],
        pass_fds=(listener.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    listener.close()
    try:
        yield path
    finally:
        process.terminate()
        process.wait(GUARD)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def receive(self, within: float = GUARD) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(
                await asyncio.wait_for(self.reader.readline(), within)
            )
            if "event" not in message:
                return message

    async def execute(self, command: str) -> dict[str, Any]:
        self.writer.write(json.dumps({"execute": command, "id": command}).encode() + b"\n")
        return await self.receive()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_commands_are_refused_before_capabilities_negotiation(monitor: Path) -> None:
    client = await Client.connect(monitor)
    greeting = await client.receive()
    assert greeting["QMP"]["version"]["qemu"]["major"] >= 7
    refused = await client.execute("query-status")
    assert refused["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in refused["error"]["desc"]
    assert refused["id"] == "query-status"
    assert await client.execute("qmp_capabilities") == {"return": {}, "id": "qmp_capabilities"}
    status = await client.execute("query-status")
    assert status["return"]["status"] == "running" and status["return"]["running"] is True
    again = await client.execute("qmp_capabilities")
    assert again["error"]["class"] == "CommandNotFound"
    await client.close()


async def test_one_monitor_client_at_a_time(monitor: Path) -> None:
    first = await Client.connect(monitor)
    await first.receive()
    second = await Client.connect(monitor)  # accepted by the kernel's backlog only
    with pytest.raises(TimeoutError):
        await second.receive(within=0.3)  # no greeting while the first holds the monitor
    await first.close()
    greeting = await second.receive()
    assert "QMP" in greeting
    assert await second.execute("qmp_capabilities") == {"return": {}, "id": "qmp_capabilities"}
    await second.close()
