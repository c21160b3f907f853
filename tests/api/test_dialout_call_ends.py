"""The dial-out when its stream's call ends under a read or a write: the session ends, the
dial-out goes on, and nothing is left for asyncio to report as never retrieved.

gRPC decides these instants inside its core (a write that starts as the call ends fails with
"Failed execute_batch"; a read or write of a call cancelled locally raises CancelledError), and
no server makes them happen on demand, so the calls here stand in for gRPC's: each does what
grpc.aio's does at that instant, when the test says.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from cocos_manager.api import dialout as dialout_module
from cocos_manager.api.dialout import DialOut
from cocos_manager.events.messages import log_message
from tests.api.test_dialout import dialing_manager, until
from tests.support.waiting import GUARD


class CallEndingUnderAWrite:
    """A stream whose write fails only after the session has moved on: gRPC core refuses a
    write that starts as the call ends ("Failed execute_batch"), then the write waits for the
    call's status and raises INTERNAL, by which time the call's end has ended the session and
    cancelled the writer. No server makes that instant happen on demand, so the call here
    stands in for one: the write is held until the test lets it fail."""

    def __init__(self) -> None:
        self.writing = asyncio.Event()
        self.fail = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        self.raised = False

    async def write(self, message: object) -> None:
        self.task = asyncio.current_task()
        self.writing.set()
        await self.fail.wait()
        self.raised = True
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="Internal error from Core",
        )


async def test_a_write_failing_after_the_session_ended_leaves_no_unseen_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix nobody looked at that write's outcome, and asyncio logged "Task
    exception was never retrieved" with two tracebacks into the daemon's log."""
    loop = asyncio.get_running_loop()
    unseen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unseen.append(context))
    try:
        async with dialing_manager(tmp_path, monkeypatch, "127.0.0.1:9") as (
            manager,
            dialout,
            _,
        ):
            call = CallEndingUnderAWrite()
            writer = asyncio.ensure_future(dialout._write(call))
            manager.service.bus.publish(log_message("held", "info", "the last line"))
            await asyncio.wait_for(call.writing.wait(), 10)
            writer.cancel()  # the session ended: its call's status came first
            await asyncio.gather(writer, return_exceptions=True)
            call.fail.set()
            assert call.task is not None
            # Waiting looks at no outcome; the write's own callbacks have run when it returns.
            await asyncio.wait({call.task})
            assert call.raised and not call.task.cancelled()  # looking would retrieve it
            call.task = None
            del writer
            gc.collect()
        assert [c.get("message") for c in unseen] == []
    finally:
        loop.set_exception_handler(None)


class StandInCall:
    """A stream that connects at once, takes every write and never ends its side (a stalled
    server's), until it is cancelled: then it ends, CANCELLED."""

    def __init__(self) -> None:
        self.ended: asyncio.Future[grpc.StatusCode] = asyncio.get_running_loop().create_future()

    async def wait_for_connection(self) -> None:
        return None

    async def read(self) -> Any:
        await asyncio.shield(self.ended)
        return grpc.aio.EOF

    async def write(self, message: object) -> None:
        return None

    async def done_writing(self) -> None:
        return None

    async def code(self) -> grpc.StatusCode:
        return await asyncio.shield(self.ended)

    async def details(self) -> str:
        return ""

    def cancel(self) -> None:
        if not self.ended.done():
            self.ended.set_result(grpc.StatusCode.CANCELLED)


class ChannelOf:
    """A channel whose every stream is a `call` (counted)."""

    def __init__(self, call: type[StandInCall]) -> None:
        self.call = call
        self.calls = 0

    def stream_stream(self, *args: object, **kwargs: object) -> Any:
        self.calls += 1
        return self.call

    async def close(self, grace: float | None = None) -> None:
        return None


class CancelledUnderItsWrites(StandInCall):
    """Its writes raise CancelledError, as grpc.aio's do once the call was cancelled locally."""

    async def write(self, message: object) -> None:
        raise asyncio.CancelledError()


async def test_a_write_raising_cancelled_ends_the_session_not_the_dial_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix the CancelledError went through the session into the runner, which
    ended as cancelled: no line said so, and the dial-out never dialled again."""
    channel = ChannelOf(CancelledUnderItsWrites)
    monkeypatch.setattr(DialOut, "_channel", lambda self: channel)
    async with dialing_manager(tmp_path, monkeypatch, "127.0.0.1:9") as (manager, dialout, _):
        manager.service.bus.publish(log_message("x", "info", "a line"))
        await until(lambda: channel.calls >= 2, "a second session")
        assert dialout._runner is not None and not dialout._runner.done()
        assert dialout.last_error == "the call was cancelled"


class ConnectsThen(StandInCall):
    """Runs `on_connect` in the loop turn its connection is made."""

    on_connect: ClassVar[list[Callable[[], None]]] = []

    async def wait_for_connection(self) -> None:
        if self.on_connect:
            asyncio.get_running_loop().call_soon(self.on_connect.pop())


async def test_a_close_in_the_turn_the_stream_connects_ends_the_dial_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() cancels the runner in the loop turn a dial's connection is made. Before the fix,
    Python 3.11's wait_for returned the connection instead of the cancellation: the session
    streamed on after close() had let it go, and close() waited for a server that never
    ended its side."""
    channel = ChannelOf(ConnectsThen)
    monkeypatch.setattr(DialOut, "_channel", lambda self: channel)
    monkeypatch.setattr(dialout_module, "BACKOFF_FIRST", 0.2)
    monkeypatch.setattr(dialout_module, "SHUTDOWN_FLUSH", 0.5)  # the server never ends its side
    async with dialing_manager(tmp_path, monkeypatch, "127.0.0.1:9") as (_, dialout, _):
        await until(lambda: dialout._streaming, "the first stream")
        closing: list[asyncio.Future[None]] = []
        ConnectsThen.on_connect.append(
            lambda: closing.append(asyncio.ensure_future(dialout.close()))
        )
        dialout._call.cancel()  # the first session ends; the next dial connects into close()
        await until(lambda: closing, "the close, as the second stream connects")
        done, _ = await asyncio.wait(closing, timeout=GUARD)
        if not done and dialout._call is not None:
            dialout._call.cancel()  # let the fixture end
        assert done, "close() waited on a session it had cancelled"
        assert not dialout._streaming
