"""A client that vanishes behind a silent network (no FIN, no RST: a cable pulled, a host
frozen) must not hold a stream's place for ever: the server pings a client with a call open
every MANAGER_GRPC_KEEPALIVE and drops it when no answer comes within
MANAGER_GRPC_KEEPALIVE_TIMEOUT.

The silent network is a TCP relay on loopback that stops moving bytes and keeps both of its
connections open, as a dropped route does: the daemon's socket stays established."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from cocos_manager.api.server import keepalive_options
from cocos_manager.config import ServiceSettings
from cocos_manager.events.messages import log_message
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.support.harness import Manager, running_manager

GUARD = 10.0


class SilentRelay:
    """Relays bytes both ways until `go_silent`; from then on it reads nothing and sends
    nothing, and closes nothing."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._silent = asyncio.Event()
        self._held: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def go_silent(self) -> None:
        self._silent.set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self._silent.is_set():
            read = asyncio.ensure_future(reader.read(65536))
            silent = asyncio.ensure_future(self._silent.wait())
            await asyncio.wait((read, silent), return_when=asyncio.FIRST_COMPLETED)
            silent.cancel()
            if not read.done():
                read.cancel()
                return
            data = read.result()
            if not data or self._silent.is_set():
                return
            writer.write(data)
            await writer.drain()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target)
        self._held += [client_w, server_w]
        for task in (self._pump(client_r, server_w), self._pump(server_r, client_w)):
            started = asyncio.ensure_future(task)
            self._tasks.add(started)
            started.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SilentRelay]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            for writer in self._held:
                writer.close()


async def subscribers(m: Manager, count: int, within: float) -> None:
    for _ in range(int(within / 0.05)):
        if m.service.bus.subscriber_count == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{m.service.bus.subscriber_count} Events subscribers, not {count}")


async def test_a_vanished_events_client_gives_its_place_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        running_manager(
            tmp_path,
            monkeypatch,
            MANAGER_EVENTS_MAX_SUBSCRIBERS="1",
            MANAGER_GRPC_KEEPALIVE="1s",
            MANAGER_GRPC_KEEPALIVE_TIMEOUT="1s",
        ) as m,
        SilentRelay(m.server.port).running() as relay,
    ):
        vanishing = grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}")
        try:
            call = pb_grpc.ManagerServiceStub(vanishing).Events(pb.EventsRequest())
            await asyncio.wait_for(call.initial_metadata(), GUARD)
            await subscribers(m, 1, GUARD)
            # Pinged a few times with no data sent (an idle stream) before the network goes.
            await asyncio.sleep(3)
            relay.go_silent()  # the client's end of the network is gone; its call stays open
            # Its place comes back once its pings go unanswered (about 2 s here); without
            # pings the daemon's socket stays established and the place taken for ever.
            await subscribers(m, 0, GUARD)
            second = m.stub.Events(pb.EventsRequest())
            await asyncio.wait_for(second.initial_metadata(), GUARD)
            await subscribers(m, 1, GUARD)
            second.cancel()
        finally:
            await vanishing.close(grace=0)


async def test_pings_leave_a_live_idle_stream_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Events stream with nothing to say, pinged many times over, stays open: a live
    client answers every ping itself."""
    async with running_manager(
        tmp_path,
        monkeypatch,
        MANAGER_GRPC_KEEPALIVE="1s",
        MANAGER_GRPC_KEEPALIVE_TIMEOUT="1s",
    ) as m:
        await stays_subscribed(m, m.stub, 4)  # about 4 pings


async def stays_subscribed(m: Manager, stub: pb_grpc.ManagerServiceStub, seconds: float) -> None:
    """An Events stream opened through `stub` is still there, and still delivers, after
    `seconds` with nothing sent on it."""
    call = stub.Events(pb.EventsRequest())
    await asyncio.wait_for(call.initial_metadata(), GUARD)
    await asyncio.sleep(seconds)
    assert m.service.bus.subscriber_count == 1
    m.service.bus.publish(log_message("c", "info", "still subscribed"))
    message = await asyncio.wait_for(call.read(), GUARD)
    assert message is not grpc.aio.EOF, await call.details()
    assert message.agent_log.message == "still subscribed"
    call.cancel()


def pinging_channel(port: int, *, without_calls: bool) -> grpc.aio.Channel:
    """A client pinging every 6 s as a Go client pings: whether or not data flows (Python's
    stops after two); `without_calls`: with no call open too."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.keepalive_time_ms", 6000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", int(without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )


async def test_a_client_pinging_every_few_seconds_keeps_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client with keepalive of its own (every 6 s, a stream open, the server's pings off so
    that they do not stand in for the client's): gRPC's default policy took a ping more often
    than every 5 minutes as a strike, and the third ended the stream with GOAWAY
    `too_many_pings` (about 24 s in)."""
    async with running_manager(tmp_path, monkeypatch, MANAGER_GRPC_KEEPALIVE="0") as m:
        pinging = pinging_channel(m.server.port, without_calls=False)
        try:
            await stays_subscribed(m, pb_grpc.ManagerServiceStub(pinging), 30)  # five pings
        finally:
            await pinging.close(grace=0)


async def test_an_idle_client_pinging_every_few_seconds_keeps_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same client with no call open (`permit_without_calls`, as a Go client set to ping
    idle connections): gRPC's default allowed it one ping per 2 hours, and the third early
    one closed the connection with GOAWAY."""
    async with running_manager(tmp_path, monkeypatch, MANAGER_GRPC_KEEPALIVE="0") as m:
        pinging = pinging_channel(m.server.port, without_calls=True)
        try:
            await asyncio.wait_for(pinging.channel_ready(), GUARD)
            await asyncio.sleep(30)  # five pings, no call
            assert pinging.get_state() is grpc.ChannelConnectivity.READY
        finally:
            await pinging.close(grace=0)


def test_keepalive_settings_below_a_second_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("MANAGER_GRPC_KEEPALIVE", "1ms"), ("MANAGER_GRPC_KEEPALIVE_TIMEOUT", "0")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match="1s or more"):
            ServiceSettings()
        monkeypatch.delenv(name)


def test_keepalive_zero_sends_no_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_GRPC_KEEPALIVE", "0")
    options = dict(keepalive_options(ServiceSettings()))
    assert "grpc.keepalive_time_ms" not in options
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 5000  # clients may ping
    monkeypatch.setenv("MANAGER_GRPC_KEEPALIVE", "1m")
    monkeypatch.setenv("MANAGER_GRPC_KEEPALIVE_TIMEOUT", "2500ms")
    assert dict(keepalive_options(ServiceSettings()))["grpc.keepalive_time_ms"] == 60_000
    assert dict(keepalive_options(ServiceSettings()))["grpc.http2.ping_timeout_ms"] == 2500
