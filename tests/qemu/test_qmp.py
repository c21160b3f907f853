"""The QMP client against a monitor served here on a UNIX socket, speaking QMP's lines."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from pathlib import Path

from cocos_manager.qemu.qmp import QmpMonitor


async def test_a_refused_negotiation_leaves_no_unseen_error(tmp_path: Path) -> None:
    """connect() queues qmp_capabilities without waiting for its answer. Before the fix an error
    answer to it was never looked at, and asyncio logged "Future exception was never
    retrieved" into the daemon's log at the next garbage collection."""
    loop = asyncio.get_running_loop()
    unseen: list[object] = []
    loop.set_exception_handler(lambda _loop, context: unseen.append(context.get("message")))
    answered = asyncio.Event()

    async def monitor_refusing_negotiation(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        await reader.readline()  # qmp_capabilities
        refusal = {"error": {"class": "CommandNotFound", "desc": "negotiation refused"}}
        writer.write(json.dumps(refusal).encode() + b"\n")
        await reader.readline()  # query-status
        writer.write(b'{"return": {"status": "running", "running": true}}\n')
        await writer.drain()
        answered.set()
        writer.close()

    path = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(monitor_refusing_negotiation, str(path))
    try:
        monitor = await QmpMonitor.connect(path)
        assert await monitor.query_status() == "running"
        await asyncio.wait_for(answered.wait(), 10)
        await monitor.close()
        del monitor
        gc.collect()
        await asyncio.sleep(0)
        assert unseen == []
    finally:
        loop.set_exception_handler(None)
        server.close()
        await server.wait_closed()


async def test_a_close_cancelled_midway_ends_cancelled(tmp_path: Path) -> None:
    """close() waits for its reader task, which it cancelled. It suppressed whatever that wait
    raised, so a caller cancelled meanwhile (a start abandoned, a shutdown) had its
    cancellation taken for the reader's and went on as if nobody had cancelled it."""
    hung_up = asyncio.Event()

    async def monitor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        await reader.readline()  # qmp_capabilities, answered once the client has gone
        with contextlib.suppress(ConnectionError):
            await reader.read()
        hung_up.set()

    path = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(monitor, str(path))
    try:
        qmp = await QmpMonitor.connect(path)
        closing = asyncio.ensure_future(qmp.close())
        await asyncio.sleep(0)  # close() is waiting for its reader
        closing.cancel()
        await asyncio.wait([closing], timeout=10)
        assert closing.cancelled()
        assert qmp.closed.done()  # closed all the same
        await asyncio.wait_for(hung_up.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()
