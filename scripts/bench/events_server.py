"""The helper processes of the events figure: `events-server managed|bare` and `agent-feeder`.

managed: the daemon's own wiring (daemon.DaemonRunner: ManagerService behind build_server with
the tracing interceptor) with one computation, fed by an agent in a process of its own over a
socket pair into AgentEventListener.serve. bare: a grpc.aio server-stream of the same messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from cocos_manager.agent.vsock import AgentEventListener
from cocos_manager.config.settings import load_settings
from cocos_manager.daemon import DaemonRunner
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from cocos_manager.telemetry.logging import configure_logging
from scripts.bench.common import REPO, run_request

AGENT_TEXT = "agent log line: computation step finished, " + "x" * 60


def agent_log(sent_ns: int = 0) -> pb.ClientStreamMessage:
    message = pb.ClientStreamMessage(
        agent_log=pb.AgentLog(message=AGENT_TEXT, computation_id="claimed-by-agent", level="info")
    )
    if sent_ns:
        message.agent_log.timestamp.FromNanoseconds(sent_ns)
    return message


def _frame(message_id: int, payload: bytes) -> bytes:
    return message_id.to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


def agent_feeder(fd: int) -> None:
    """The agent, in a process of its own (it lives in a guest, not in the manager): writes
    framed messages into its end of the socket pair and reads the acks. stdin: commands as
    for the events server; stdout: one line when the messages are written."""
    sock = socket.socket(fileno=fd)
    acked = [0]

    def read_acks() -> None:
        while data := sock.recv(65536):
            acked[0] += len(data) // 4

    threading.Thread(target=read_acks, daemon=True).start()
    next_id = 1
    for line in sys.stdin:
        kind, count_text, rate_text = line.split()
        count, rate = int(count_text), float(rate_text)
        if kind == "throughput":
            payload = agent_log().SerializeToString()
            sock.sendall(b"".join(_frame(next_id + i, payload) for i in range(count)))
        else:
            start = time.perf_counter()
            for i in range(count):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                payload = agent_log(time.time_ns()).SerializeToString()
                sock.sendall(_frame(next_id + i, payload))
        next_id += count
        sys.stdout.write(f"{acked[0]}\n")
        sys.stdout.flush()


async def events_server(mode: str) -> None:
    """stdin: `throughput N 0` / `latency N RATE`; stdout: one JSON line per command."""

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "")

    threading.Thread(target=read_stdin, daemon=True).start()

    def say(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    if mode == "bare":
        await _bare_events_server(commands, say)
        return

    settings = load_settings()
    configure_logging(settings.service.LOG_LEVEL, sys.stderr)
    runner = DaemonRunner(settings)  # the daemon's own wiring, tracing interceptor included
    try:
        await runner.setup()
        await runner.start()
        assert runner.service is not None and runner.server is not None
        await _serve_managed(runner, commands, say)
    finally:
        await runner.cleanup()


async def _serve_managed(
    runner: DaemonRunner,
    commands: asyncio.Queue[str],
    say: Callable[[dict[str, Any]], None],
) -> None:
    service, bus, server = runner.service, runner.bus, runner.server
    assert service is not None and server is not None
    computation_id = "events-bench"
    await service.run(run_request(computation_id))
    cid = service.computations()[computation_id].resources.guest_cid
    # The runner's own listener where the agent channel is vsock; wired as it wires it if not.
    listener = runner.agents or AgentEventListener(
        service.computation_for_cid, service.publish_agent_message, pace=bus.pace
    )
    manager_end, agent_end = socket.socketpair()
    manager_end.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=manager_end)
    serving = asyncio.ensure_future(listener.serve(reader, writer, cid))
    feeder = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "scripts.bench", "agent-feeder", str(agent_end.fileno())],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(agent_end.fileno(),),
        text=True,
    )
    agent_end.close()
    assert feeder.stdin is not None and feeder.stdout is not None

    def feed(command: str) -> None:
        assert feeder.stdin is not None and feeder.stdout is not None
        feeder.stdin.write(command + "\n")
        feeder.stdin.flush()
        feeder.stdout.readline()

    say({"port": server.port, "computation_id": computation_id, "cid": cid})
    try:
        while command := await commands.get():
            while bus.subscriber_count < 1:  # noqa: ASYNC110 (the bench's own subscriber)
                await asyncio.sleep(0.001)
            dropped = bus.dropped
            await asyncio.to_thread(feed, command)
            say({"sent": int(command.split()[1]), "dropped": bus.dropped - dropped})
    finally:
        feeder.stdin.close()
        await asyncio.to_thread(feeder.wait)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(serving, 5)


async def _bare_events_server(
    commands: asyncio.Queue[str], say: Callable[[dict[str, Any]], None]
) -> None:
    pending: asyncio.Queue[tuple[str, int, float, asyncio.Future[None]]] = asyncio.Queue()
    subscribed = asyncio.Event()

    class Bare(pb_grpc.ManagerServiceServicer):  # type: ignore[misc]
        async def Events(
            self, request: pb.EventsRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[pb.ClientStreamMessage]:
            subscribed.set()
            kind, count, rate, finished = await pending.get()
            try:
                if kind == "throughput":
                    message = agent_log()
                    message.agent_log.computation_id = request.computation_id
                    for _ in range(count):
                        yield message
                else:
                    start = time.perf_counter()
                    for i in range(count):
                        delay = start + i / rate - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        message = agent_log(time.time_ns())
                        message.agent_log.computation_id = request.computation_id
                        yield message
            finally:
                if not finished.done():
                    finished.set_result(None)

    server = grpc.aio.server()
    pb_grpc.add_ManagerServiceServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    say({"port": port, "computation_id": "events-bench"})
    while command := await commands.get():
        kind, count, rate = command.split()
        await subscribed.wait()
        subscribed.clear()
        finished = asyncio.get_running_loop().create_future()
        await pending.put((kind, int(count), float(rate), finished))
        await finished
        say({"sent": int(count), "dropped": 0})
    await server.stop(1)
