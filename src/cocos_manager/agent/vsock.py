"""AF_VSOCK transport between the manager and the agents in its guests.

Ports and framing: docs/contracts.md, "Agent channel".

Two directions: the manager connects to the agent to hand over the manifest (port 9999), and
agents connect to the manager to stream events and logs (port 9997). Both are written against
asyncio streams so tests can run them over unix sockets when this host has no vsock device.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cocos_manager.agent.protocol import close_writer, serve_agent_connection
from cocos_manager.proto.manager_pb2 import ClientStreamMessage
from cocos_manager.telemetry import get_logger

AGENT_MANIFEST_PORT = 9999
AGENT_EVENTS_PORT = 9997
DEFAULT_MAX_CONNECTIONS_PER_CID = 4
FINISH_WAIT = 2.0
"""Seconds the release waits for a VM's agent connections to end (each closes its writer
within a second, protocol._CLOSE_TIMEOUT)."""

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
Publish = Callable[[ClientStreamMessage], None]

# Errors that say "this host cannot do it", not "the guest is not listening yet": retrying
# them would only turn an immediate, explainable failure into a timeout.
_PERMANENT_ERRNOS = frozenset(
    {errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EACCES, errno.EPERM}
)


class HandoverError(Exception):
    """The manifest did not reach the agent."""


class HandoverAborted(HandoverError):
    """QEMU exited while the manager was still trying; waiting longer could not help."""


class HandoverTimeout(HandoverError):
    """The agent did not accept the manifest in time (the guest never booted, or hangs)."""


class HandoverFailed(HandoverError):
    """An error no retry can fix, e.g. this host has no AF_VSOCK."""


@dataclass(slots=True)
class _Progress:
    attempts: int = 0
    last_error: str = "none"


def _fired(abort: asyncio.Future[Any] | asyncio.Event) -> bool:
    return abort.is_set() if isinstance(abort, asyncio.Event) else abort.done()


def _is_permanent(error: OSError) -> bool:
    return error.errno in _PERMANENT_ERRNOS


async def _deliver_once(connect: Connect, payload: bytes) -> None:
    _, writer = await connect()
    try:
        writer.write(payload)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    finally:
        writer.close()
    # A clean close flushes what is buffered; an error here means the payload may be lost.
    await writer.wait_closed()


async def _deliver(
    connect: Connect,
    payload: bytes,
    progress: _Progress,
    initial_delay: float,
    max_delay: float,
) -> int:
    delay = initial_delay
    while True:
        progress.attempts += 1
        try:
            await _deliver_once(connect, payload)
        except OSError as error:
            progress.last_error = f"{type(error).__name__}: {error}"
            if _is_permanent(error):
                raise HandoverFailed(f"manifest hand-over failed: {progress.last_error}") from error
        else:
            return progress.attempts
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)


async def send_manifest(
    connect: Connect,
    payload: bytes,
    *,
    abort: asyncio.Future[Any] | asyncio.Event,
    initial_delay: float = 0.05,
    max_delay: float = 2.0,
    timeout: float,
) -> int:
    """Writes payload to the agent once it listens; returns the number of connection attempts.

    The agent listens only after its guest has booted, so refused/reset/no-device connections
    are retried with exponential back-off. ``abort`` fires when QEMU exits: the hand-over then
    stops at once with HandoverAborted instead of retrying until ``timeout``.
    It may be the supervisor's exit Future (done with a result or an exception, either counts;
    only watched, never cancelled) or an Event that is set on exit.
    """
    if _fired(abort):
        raise HandoverAborted("QEMU exited before the manifest hand-over started")
    progress = _Progress()
    delivery = asyncio.ensure_future(_deliver(connect, payload, progress, initial_delay, max_delay))
    exited = asyncio.ensure_future(abort.wait()) if isinstance(abort, asyncio.Event) else abort
    try:
        done, _ = await asyncio.wait(
            (delivery, exited), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        owned: list[asyncio.Future[Any]] = [delivery] if exited is abort else [delivery, exited]
        for task in owned:
            task.cancel()
        await asyncio.wait(owned)
    if delivery in done:
        return delivery.result()
    if exited in done:
        raise HandoverAborted(
            f"QEMU exited during the manifest hand-over after {progress.attempts} attempt(s) "
            f"(last error: {progress.last_error})"
        )
    raise HandoverTimeout(
        f"agent did not accept the manifest within {timeout:g} s: {progress.attempts} attempt(s), "
        f"last error: {progress.last_error}"
    )


def vsock_connector(cid: int, port: int = AGENT_MANIFEST_PORT) -> Connect:
    """A Connect for send_manifest that reaches (cid, port) over AF_VSOCK."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (cid, port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    return connect


class AgentEventListener:
    """Accepts agents' event/log connections on (VMADDR_CID_ANY, port).

    The peer's CID names the computation, resolved through ``resolve_cid`` when the connection
    is accepted. Everything runs on the event loop thread, so the CID map behind
    ``resolve_cid`` needs no lock as long as it is only changed on that loop;
    a VM's CID must be registered before QEMU starts or its agent's first connection is refused.
    """

    def __init__(
        self,
        resolve_cid: Callable[[int], str | None],
        publish: Publish,
        port: int = AGENT_EVENTS_PORT,
        pace: Callable[[str], Awaitable[None] | None] | None = None,
        max_per_cid: int = DEFAULT_MAX_CONNECTIONS_PER_CID,
    ) -> None:
        """`max_per_cid` (MANAGER_AGENT_MAX_CONNECTIONS_PER_CID, 0 = no limit) bounds the
        connections one guest may hold open: each costs a task, buffers and a descriptor, and
        an agent needs one (a second while it reconnects)."""
        self._resolve_cid = resolve_cid
        self._publish = publish
        self._pace = pace
        self._max_per_cid = max_per_cid
        self._refused: dict[int, int] = {}
        self._port = port
        self._server: asyncio.Server | None = None
        # Each connection's task: its peer's CID and the writer to it.
        self._connections: dict[asyncio.Task[object], tuple[int, asyncio.StreamWriter]] = {}
        self._log = get_logger(port=port)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> bool:
        """Listens if this host can; False (one warning logged) if it has no usable AF_VSOCK.

        Without vsock the manager still runs VMs; it only hears nothing from their agents.
        """
        if self._server is not None:
            return True
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except (AttributeError, OSError) as error:
            self._log.warning(
                "AF_VSOCK unavailable; agent events will not be received", reason=str(error)
            )
            return False
        try:
            sock.bind((socket.VMADDR_CID_ANY, self._port))
            sock.listen()
            sock.setblocking(False)
            self._server = await asyncio.start_server(self._accepted, sock=sock)
        except OSError as error:
            sock.close()
            self._log.warning(
                "cannot listen on AF_VSOCK; agent events will not be received",
                reason=f"{type(error).__name__}: {error}",
            )
            return False
        return True

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        cid = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], int) else None
        if cid is None:
            self._log.warning("agent connection without a peer CID; closed", peer=repr(peer))
            await close_writer(writer)
            return
        await self.serve(reader, writer, cid)

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> int:
        """Serves one connected agent whose CID is ``cid``; returns the messages published.

        Used for every accepted vsock connection; tests call it with a socketpair.
        """
        if self._max_per_cid and self.connections_of(cid) >= self._max_per_cid:
            refused = self._refused[cid] = self._refused.get(cid, 0) + 1
            if refused == 1:  # once per burst: a guest cannot flood the log either
                self._log.warning(
                    "agent connection over the limit for its CID; closed",
                    cid=cid,
                    limit=self._max_per_cid,
                )
            await close_writer(writer)
            return 0
        if self._refused.pop(cid, 0) > 1:
            self._log.warning("agent connections were refused", cid=cid)
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = (cid, writer)
        try:
            computation_id = self._resolve_cid(cid)
            if computation_id is None:
                self._log.warning("agent connection from an unknown CID; closed", cid=cid)
                await close_writer(writer)
                return 0
            return await serve_agent_connection(
                reader, writer, computation_id, self._publish, self._pace
            )
        finally:
            if task is not None:
                self._connections.pop(task, None)

    def connections_of(self, cid: int) -> int:
        return len(self._of(cid))

    def _of(self, cid: int) -> dict[asyncio.Task[object], asyncio.StreamWriter]:
        return {task: writer for task, (owner, writer) in self._connections.items() if owner == cid}

    async def finish(self, cid: int) -> None:
        """Ends the connections of ``cid`` once its VM's QEMU is gone, before the VM's final
        event: one held at its pace wait publishes the rest of its batch, which it acked. Its
        socket is aborted, not flushed: no ack is worth waiting for once the guest is gone (an
        agent that read none held a release for the close's whole grace). Bounded by
        FINISH_WAIT; whatever still runs then is cancelled again by `disconnect`."""
        tasks = self._of(cid)
        for task, writer in tasks.items():
            task.cancel()
            writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=FINISH_WAIT)

    def disconnect(self, cid: int) -> int:
        """Drops the connections of ``cid`` (its VM stopped), so a later VM given the same CID
        cannot inherit them; returns how many were dropped."""
        tasks = self._of(cid)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def close(self) -> None:
        """Stops listening, then cancels and awaits every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if server is not None:
            await server.wait_closed()
