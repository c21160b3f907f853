"""The dial-out at the daemon's shutdown: what was published before it reaches the computations
server, also a server that reads it late, and also on a stream that connected a moment ago.

A write the stream's gRPC call has taken is not a message the server has read: the server's
side still holds it, and a stream cancelled then loses it. The server here is the raw handler
(tests/support/raw_computations_server.py) made not reading, so the dial-out's writes are
taken and held unread until the test lets it read. Before the fix, `close()` returned once
the writes were taken (or at once, within SETTLE of the connection) and cancelled the
stream: the messages never arrived.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cocos_manager.api import dialout as dialout_module
from cocos_manager.api.dialout import DialOut
from cocos_manager.events.messages import log_message, shutdown_notice
from cocos_manager.telemetry.metrics import Metrics
from tests.api.test_dialout import dialing_manager, until
from tests.support.raw_computations_server import RawComputationsServer

LATE = 1.0
"""How long the server leaves the messages unread once the dial-out closes (unless the
close is over before): a server behind, as a loaded host makes it."""


async def close_with_a_late_reader(dialout: DialOut, server: RawComputationsServer) -> None:
    closing = asyncio.ensure_future(dialout.close())
    await asyncio.wait({closing}, timeout=LATE)
    server.read_again()
    await closing


def buffered(metrics: Metrics) -> float:
    return float(metrics.dialout_buffered.value())


@pytest.mark.parametrize("settled", [True, False], ids=["connected", "within-settle"])
async def test_what_was_published_before_the_close_reaches_a_server_that_reads_it_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: bool
) -> None:
    # The flush's bound is not what this is about: a loaded host never runs into it here.
    monkeypatch.setattr(dialout_module, "SHUTDOWN_FLUSH", 60.0)
    if not settled:  # the stream is up but does not count as connected yet
        monkeypatch.setattr(dialout_module, "SETTLE", 60.0)
    server = RawComputationsServer(reading=False)
    await server.start()
    try:
        async with dialing_manager(tmp_path, monkeypatch, server.url) as (
            manager,
            dialout,
            metrics,
        ):
            await server.wait_for(lambda: server.connections == 1, "the dial-out's stream")
            if settled:
                await until(lambda: dialout.connected, "the dial-out to count as connected")
            for i in range(3):
                manager.service.bus.publish(log_message("late", "info", f"line {i}"))
            manager.service.bus.publish(shutdown_notice("complete", {"left_running": []}))
            # Every write taken (the server's side holds them, unread): what the flush at
            # close waited for before.
            await until(lambda: buffered(metrics) == 0, "the writes to be taken")
            assert dialout.connected is settled
            await close_with_a_late_reader(dialout, server)
            await server.wait_for(
                lambda: server.events("", "manager-shutdown", "complete"), "the last notice"
            )
            lines = [m.agent_log.message for m in server.received if m.HasField("agent_log")]
            assert lines == ["line 0", "line 1", "line 2"]
    finally:
        await server.stop()
