"""Dial-out to a computations server: the original Manager's deployment (MANAGER_GRPC_URL).

The original daemon was a gRPC *client*: it dialled the computations server and served its
`/manager.ManagerService/Process` stream, sending `ClientStreamMessage`s (every event and log
of every computation, and a `run_res` per started computation) and receiving
`ComputationRunReq`s. This port keeps its own server and, when MANAGER_GRPC_URL is set, does
the same besides. Where the original died (a failed Run ended the stream and the daemon; no
reconnection; a slow stream blocked Run), this one:

- runs each request in its own task (several at once), through `ManagerService.run`, so these
  are the same computations as any other: Stop, Events and restart survival apply;
- answers a failed Run with a `vm-provision`/`failed` event carrying the error (and its gRPC
  code) and goes on;
- retries a dropped stream or an unreachable server with capped, jittered back-off, while the
  VMs keep running;
- keeps what is produced meanwhile in a bounded buffer and sends it after reconnection; what
  overflows is counted and logged once per burst. Run and the event bus only ever append to
  that buffer, so a slow server never slows them;
- holds at most BUFFER_SIZE messages (BUFFER_BYTES of events and logs) and REQUESTS_IN_FLIGHT
  requests whatever the server or the guests do (dialout_buffer.py): a request is read only
  when its answer has room, so a server that sends and reads nothing is held back by HTTP/2
  flow control, not by the daemon's memory;
- reads raw bytes and decodes them itself (dialout_requests.py): a message that is no
  ComputationRunReq is counted, logged (rate-limited) and answered when it still names its
  id, and the stream goes on; whatever else goes wrong in a session ends that session, which
  is dialled again, never the dial-out or the daemon's shutdown.

The service has another definition on the server side with the same full name (our own Run,
Stop and Events): the method path is spoken here directly rather than through generated stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from cocos_manager.api.dialout_buffer import OutgoingBuffer
from cocos_manager.api.dialout_requests import Complaints
from cocos_manager.api.dialout_runs import RunRequests
from cocos_manager.config import (
    DialOutConfig,
    ServiceSettings,
    TlsConfigError,
    dialout_config,
    rejected_certificate,
    retry_fields,
)

# Re-exported: daemon.py names the error the dial-out refuses start-up with here.
from cocos_manager.config import DialOutConfigError as DialOutConfigError
from cocos_manager.host import outcome_seen
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.service import ManagerService
from cocos_manager.telemetry import METRICS, Metrics, get_logger

PROCESS_METHOD = "/manager.ManagerService/Process"
HEALTH_SERVICE = "manager.DialOut"
"""Name under which the health service reports the dial-out: SERVING while connected."""

BUFFER_SIZE = 10_000
"""Messages kept for the stream while it is down or behind, answers to requests included. An
answer is never dropped: a request is read only when there is room for its answer (requests
in flight hold one place each), and events and logs are dropped when there is none."""
BUFFER_BYTES = 16 * 1024 * 1024
"""Bytes of events and logs kept, whatever their number (an agent's message may be up to
1 MiB): the bound of an Events subscriber's queue by default (MANAGER_EVENTS_QUEUE_BYTES)."""
REQUESTS_IN_FLIGHT = 256
"""Requests handled at once; the next one is read when one ends (far above what MAX_VMS-sized
hosts start at once, and a bound on the tasks a flood of requests can make)."""
REQUEST_BYTES_IN_FLIGHT = 64 * 1024 * 1024
"""The same bound in bytes: requests are held by their Runs until the VM runs."""
BACKOFF_FIRST = 0.25
BACKOFF_CAP = 30.0  # as the original client's maxTryDelay
STABLE_AFTER = 10.0
"""A stream that stayed up this long resets the back-off to its first step."""
SETTLE = 0.25
"""A stream the server ends this soon (e.g. UNIMPLEMENTED: not a computations server) is a
failed attempt, not a connection: the log and health would flap otherwise."""
SHUTDOWN_FLUSH = 5.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Go servers refuse client pings more often than every 5 minutes (GOAWAY "too_many_pings"):
# 6 minutes stays clear of that and still finds a vanished server while the stream is idle.
KEEPALIVE_MS = 360_000

_log = get_logger()


class DialOut:
    """One Process stream at a time to the computations server, for the daemon's lifetime.

    Made before the service recovers VMs of an earlier run (so that their re-adoption events
    are forwarded too), started once the daemon serves, closed after the VMs were stopped at
    shutdown (so that their vm-stop events go up the stream, within SHUTDOWN_FLUSH).
    """

    @classmethod
    def configure(
        cls, service_settings: ServiceSettings, service: ManagerService
    ) -> DialOut | None:
        """The daemon's dial-out, or None without MANAGER_GRPC_URL; DialOutConfigError (the
        line the operator sees) for settings it cannot work with."""
        try:
            config = dialout_config(service_settings)
        except TlsConfigError as error:
            raise DialOutConfigError(str(error)) from None
        if config is None:
            return None
        if service_settings.GRPC_MANIFEST:
            _log.warning(
                "MANAGER_GRPC_MANIFEST is ignored: it configures attested TLS, not supported here"
            )
        return cls(config, service)

    def __init__(
        self,
        config: DialOutConfig,
        service: ManagerService,
        *,
        buffer_size: int = BUFFER_SIZE,
        metrics: Metrics = METRICS,
    ) -> None:
        self.config = config
        self._service = service
        self._metrics = metrics
        self._buffer = OutgoingBuffer(
            buffer_size, BUFFER_BYTES, REQUESTS_IN_FLIGHT, REQUEST_BYTES_IN_FLIGHT, metrics
        )
        self._complaints = Complaints(_log)
        self._requests = RunRequests(service, self._buffer, metrics, self._complaints)
        self.connected = False
        self._said_down = False  # "dial-out retrying" logged for the current outage
        self.connects = 0
        self.attempts = 0  # failed ones
        self.pauses: list[float] = []  # the first back-off pauses, for tests and debugging
        self.last_error = ""
        self._rejected: str | None = None  # the server certificate gRPC did not trust
        self._health: health.aio.HealthServicer | None = None
        self._health_updates: set[asyncio.Future[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._call: Any = None
        self._streaming = False  # a session's call is up (connected or not yet SETTLEd)
        self._untap = service.bus.tap(self._on_bus_message)
        metrics.register_dialout()
        self._registered = True
        metrics.dialout_connected.set(0)

    @property
    def dropped_total(self) -> int:
        return self._buffer.dropped_total

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, health_servicer: health.aio.HealthServicer | None = None) -> None:
        self._health = health_servicer
        _log.info(f"dial-out to {self.config.target} {self.config.description}")
        self._runner = asyncio.ensure_future(self._run())
        self._runner.add_done_callback(self._runner_ended)
        self._report_health()

    def _runner_ended(self, runner: asyncio.Task[None]) -> None:
        """`_run` ends only when cancelled; should a bug end it otherwise, the state says so."""
        if runner.cancelled():
            if not self._closing.is_set():
                _log.error("dial-out stopped: cancelled while not closing")
                self._closing.set()  # for good: nothing retries, so no "retrying" line
                self._set_connected(False, "the dial-out stopped: cancelled")
            return
        if (error := runner.exception()) is None:
            return
        _log.error("dial-out stopped", error=repr(error), exc_info=error)
        self._set_connected(False, f"the dial-out stopped: {error!r}")

    async def close(self) -> None:
        """Waits for requests in flight, then sends what is buffered and ends the stream: the
        writer half-closes it after the last message, and the session ends when the server
        ends its side, having read them all (for at most SHUTDOWN_FLUSH; at once when no
        stream is up). Then closes the channel. Never raises: the daemon's shutdown goes on
        whatever happened to the stream."""
        try:
            await self._requests.settle(SHUTDOWN_FLUSH)
        except Exception:
            _log.exception("dial-out: requests in flight at shutdown failed")
        self._buffer.finish()
        self._closing.set()  # no session after this one
        if self._runner is not None:
            if self._streaming:
                await asyncio.wait({self._runner}, timeout=SHUTDOWN_FLUSH)
            self._runner.cancel()
            done, _ = await asyncio.wait({self._runner}, timeout=SHUTDOWN_FLUSH)
            if not done and self._call is not None:  # its cancellation was swallowed: the
                self._call.cancel()  # call's end ends the session, and `_closing` the rest
            await asyncio.gather(self._runner, return_exceptions=True)  # _runner_ended said it
        self._untap()
        self._complaints.flush()
        self._set_connected(False, "closed")
        if self._registered:  # no dial-out any more: its series go with it
            self._registered = False
            self._metrics.unregister_dialout()
        if self._health is not None:
            with contextlib.suppress(Exception):
                await self._health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    # -- the outgoing buffer -----------------------------------------------------------------

    def _on_bus_message(self, message: pb.ClientStreamMessage) -> None:
        """Called inside EventBus.publish: appends or drops, never waits."""
        self._requests.on_bus_message(message, self.connected)

    # -- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while not self._closing.is_set():
            began = loop.time()
            try:
                reason = await self._session()
            except Exception as error:  # a bug: this session ends, the dial-out goes on
                _log.exception("dial-out session failed")
                reason = f"internal error: {error!r}"
            lasted = loop.time() - began
            self._set_connected(False, reason)
            self.attempts += 1
            self.last_error = reason
            if lasted >= STABLE_AFTER:
                delay = BACKOFF_FIRST
            pause = delay / 2 + random.uniform(0, delay / 2)
            delay = min(BACKOFF_CAP, delay * 2)
            if len(self.pauses) < 32:
                self.pauses.append(pause)
            _log.debug("dial-out attempt failed", error=reason, retry_in=round(pause, 3))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._closing.wait()

    def _channel(self) -> grpc.aio.Channel:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            # A C int of milliseconds (24.8 days): a longer MANAGER_GRPC_TIMEOUT is capped.
            ("grpc.keepalive_timeout_ms", min(int(self.config.timeout * 1000), 2**31 - 1)),
            # Reconnection is this module's back-off, not the channel's own.
            ("grpc.enable_retries", 0),
        ]
        if self.config.credentials is None:
            return grpc.aio.insecure_channel(self.config.target, options=options)
        return grpc.aio.secure_channel(self.config.target, self.config.credentials, options)

    async def _session(self) -> str:
        """One stream, from dialling to its end; returns why it ended."""
        channel = self._channel()
        try:
            # Raw bytes in: decoded by RunRequests.on_message (dialout_requests.py), not by gRPC.
            call = channel.stream_stream(
                PROCESS_METHOD, request_serializer=pb.ClientStreamMessage.SerializeToString
            )()
            self._call = call
            try:
                # Not wait_for: on Python 3.11 it returns the result when the cancellation of
                # this task (close()) comes in the turn the connection is made, and a session
                # would then stream after close() had let it go.
                async with asyncio.timeout(self.config.timeout):
                    await call.wait_for_connection()
            except TimeoutError:
                call.cancel()
                return f"no connection within MANAGER_GRPC_TIMEOUT ({self.config.timeout:g}s)"
            except grpc.aio.AioRpcError as error:
                await self._note_rejected_certificate(error)
                return _describe(error)
            self._streaming = True
            reader = asyncio.ensure_future(self._read(call))
            writer = asyncio.ensure_future(self._write(call))
            # The reader may be waiting for room, not reading: the call's own end still shows.
            ended = asyncio.ensure_future(_ended(call))
            tasks = {reader, writer, ended}
            try:
                done, _ = await asyncio.wait(tasks, timeout=SETTLE)
                if not done:
                    self._set_connected(True)
                done, _ = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
                first = done.pop()
                # gRPC raises CancelledError from a read or write of a call cancelled locally:
                # that ends this session, never the dial-out.
                return "the call was cancelled" if first.cancelled() else first.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
        finally:
            self._call, self._streaming = None, False
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    async def _read(self, call: Any) -> str:
        try:
            while True:
                await self._buffer.wait_for_room()  # else HTTP/2 flow control holds the server back
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return "the server ended the stream"
                self._set_connected(True)  # a request is proof enough, before SETTLE
                self._requests.on_message(raw)
        except grpc.aio.AioRpcError as error:
            return _describe(error)

    async def _write(self, call: Any) -> str:
        timeout = self.config.timeout
        while True:
            message = await self._buffer.next()
            if message is None:  # shutting down, and everything was sent
                return await _half_close(call)
            # Not wait_for: a write held by flow control does not end when cancelled, and
            # wait_for would wait for it. The session's end cancels the call, which ends it.
            write = asyncio.ensure_future(call.write(message))
            # Seen even if abandoned (a timeout; a session ended before this write failed).
            write.add_done_callback(outcome_seen)
            done, _ = await asyncio.wait({write}, timeout=timeout)
            if not done:
                return f"the server took no message for MANAGER_GRPC_TIMEOUT ({timeout:g}s)"
            try:
                write.result()
            except grpc.aio.AioRpcError as error:
                return _describe(error)
            except Exception as error:  # e.g. a write on a call that has just ended
                return f"write failed: {error!r}"
            self._buffer.sent(message)

    async def _note_rejected_certificate(self, error: grpc.aio.AioRpcError) -> None:
        """Whose certificate gRPC rejected, for the next "dial-out retrying" line."""
        if not self._said_down:  # once per outage, not a handshake of our own per retry
            self._rejected = await rejected_certificate(error.details() or "", self.config)

    def _retrying(self, reason: str) -> None:
        """Said once per outage, with what a TLS failure likely means (as the CLI says it)."""
        self._said_down = True
        extra = retry_fields(reason, self.config.mode, self._rejected)
        self._rejected = None
        _log.warning("dial-out retrying", url=self.config.target, error=reason, **extra)

    def _set_connected(self, connected: bool, reason: str = "") -> None:
        if connected == self.connected:
            # Never connected yet: the first failure is said too (a wrong URL must show).
            if not connected and reason and not self._said_down and not self._closing.is_set():
                self._retrying(reason)
            return
        self.connected = connected
        self._metrics.dialout_connected.set(1 if connected else 0)
        if connected:
            self.connects += 1
            self._said_down = False
            _log.info("dial-out connected", url=self.config.target, buffered=len(self._buffer))
        elif not self._closing.is_set():
            self._retrying(reason)
        self._report_health()

    def _report_health(self) -> None:
        if self._health is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.connected
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.ensure_future(self._health.set(HEALTH_SERVICE, status))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)


async def _half_close(call: Any) -> str:
    """The end of the stream after the last message. A write done only says that gRPC took
    the message; the server's side may still hold it unread, and a call cancelled then loses
    it. A server ends its side once it has read everything up to the half-close, so the
    session ends then (close() bounds the wait)."""
    try:
        await call.done_writing()
    except Exception as error:  # the call ended meanwhile
        return f"half-close failed: {error!r}"
    return await _ended(call)


async def _ended(call: Any) -> str:
    """Why the call ended, once it has (the server's status, or a cancellation)."""
    code = await call.code()
    if code is grpc.StatusCode.OK:
        return "the server ended the stream"
    return f"{code.name}: {await call.details()}"


def _describe(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"
