"""A misbehaving computations server in the test's own event loop: the `Process` method served
by a raw grpc.aio generic handler, so it sends whatever bytes the test gives (a truncated field,
a flood) and can stop reading what the Manager sends.

`computations_server.py` is the well-behaved server of the seed's proto; this one knows no
message classes at all (no serializers: bytes in, bytes out), which is the point: a buggy peer
is not bound by the proto either. The test decodes what came back with the daemon's own
`ClientStreamMessage` (same names and field numbers as the seed's).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from cocos_manager.proto import manager_pb2 as pb

PROCESS_METHOD = "/manager.ManagerService/Process"


class RawComputationsServer:
    """`push` bytes to the stream connected last (or the next one); `received` holds what the
    Manager sent, decoded. `reading=False`: the server reads nothing until `read_again()`,
    and HTTP/2 flow control holds the Manager's writes back."""

    def __init__(self, *, reading: bool = True) -> None:
        self._reading = asyncio.Event()
        if reading:
            self._reading.set()
        self.port = 0
        self.connections = 0
        self.sent = 0  # messages the server's gRPC took (flow control let through)
        self.received: list[pb.ClientStreamMessage] = []
        self._pending: list[bytes] = []
        self._streams: list[asyncio.Queue[bytes | None]] = []
        self._changed = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Serves (again on the port it had, after a stop)."""
        handler = grpc.method_handlers_generic_handler(
            "manager.ManagerService",
            {"Process": grpc.stream_stream_rpc_method_handler(self._process)},
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    def push(self, *messages: bytes) -> None:
        self._pending.extend(messages)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._pending and self._streams:
            self._streams[-1].put_nowait(self._pending.pop(0))

    async def _process(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.connections += 1
        self._streams.append(outgoing)
        self._dispatch()
        self._changed.set()
        reader = asyncio.ensure_future(self._read(requests, outgoing))
        try:
            while (item := await outgoing.get()) is not None:
                yield item
                self.sent += 1
                self._changed.set()
        finally:
            self._streams.remove(outgoing)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._changed.set()

    async def _read(self, requests: AsyncIterator[bytes], outgoing: asyncio.Queue[Any]) -> None:
        await self._reading.wait()  # meanwhile flow control holds the Manager back
        with contextlib.suppress(Exception):
            async for raw in requests:
                self.received.append(pb.ClientStreamMessage.FromString(raw))
                self._changed.set()
        outgoing.put_nowait(None)  # the Manager half-closed: end our side too

    def read_again(self) -> None:
        """A server created with `reading=False` reads its streams from now on."""
        self._reading.set()

    async def wait_for(
        self, condition: Callable[[], object], what: str, timeout: float = 20.0
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"computations server: no {what} within {timeout:g}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))

    def run_res(self, computation_id: str) -> pb.RunResponse | None:
        for message in self.received:
            if message.HasField("run_res") and message.run_res.computation_id == computation_id:
                return message.run_res
        return None

    def events(self, computation_id: str, event_type: str, status: str) -> list[pb.AgentEvent]:
        return [
            m.agent_event
            for m in self.received
            if m.HasField("agent_event")
            and m.agent_event.computation_id == computation_id
            and m.agent_event.event_type == event_type
            and m.agent_event.status == status
        ]
