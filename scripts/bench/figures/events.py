"""Figure 4: agent messages/s from an agent (a process of its own) through the framed agent
protocol into the daemon's wiring, out to an Events subscriber here; beside a bare grpc.aio
server-stream of the same messages. The two servers are helper processes
(scripts/bench/events_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from scripts.bench.common import REPO, log
from scripts.bench.report import Figure, percentile, summary


@dataclass
class EventRun:
    rate: float  # messages/s delivered
    received: int
    sent: int
    dropped: int
    p50_ms: float = 0.0
    p99_ms: float = 0.0


AGENT_TEXT = "agent log line: computation step finished, " + "x" * 60


def agent_log(sent_ns: int = 0) -> pb.ClientStreamMessage:
    message = pb.ClientStreamMessage(
        agent_log=pb.AgentLog(message=AGENT_TEXT, computation_id="claimed-by-agent", level="info")
    )
    if sent_ns:
        message.agent_log.timestamp.FromNanoseconds(sent_ns)
    return message


class EventServer:
    """The helper process of figure 4 (managed: the manager's own code; bare: grpc.aio only)."""

    def __init__(self, mode: str, env: dict[str, str], log: Any) -> None:
        self.mode = mode
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.computation_id = ""

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scripts.bench",
            "events-server",
            self.mode,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        hello = json.loads(await self._line())
        self.port = hello["port"]
        self.computation_id = hello["computation_id"]

    async def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"events-server {self.mode} exited")
        return line.decode()

    async def command(self, text: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()
        return dict(json.loads(await self._line()))

    async def measure(self, kind: str, count: int, rate: float) -> EventRun:
        """Subscribes, has the server send `count` messages, receives them."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.ManagerServiceStub(channel)
            call = stub.Events(pb.EventsRequest(computation_id=self.computation_id))
            received = 0
            latencies: list[float] = []
            done = asyncio.get_running_loop().create_future()
            last = [0.0]

            async def consume() -> None:
                nonlocal received
                async for message in call:
                    now_ns = time.time_ns()
                    last[0] = time.perf_counter()
                    received += 1
                    if kind == "latency":
                        latencies.append(
                            (now_ns - message.agent_log.timestamp.ToNanoseconds()) / 1e6
                        )
                    if received == count and not done.done():
                        done.set_result(None)

            consumer = asyncio.ensure_future(consume())
            started = time.perf_counter()
            reply = await self.command(f"{kind} {count} {rate}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), 10.0)
            ended = last[0]
            call.cancel()
            with contextlib.suppress(BaseException):
                await consumer
        run = EventRun(
            rate=received / (ended - started) if received else 0.0,
            received=received,
            sent=int(reply["sent"]),
            dropped=int(reply.get("dropped", 0)),
        )
        if latencies:
            run.p50_ms = percentile(latencies, 50)
            run.p99_ms = percentile(latencies, 99)
        return run

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def fig_events(
    work: Path,
    env: dict[str, str],
    reps: int,
    count: int,
    latency_count: int,
    latency_rate: float,
    figures: list[Figure],
) -> None:
    log(
        f"events: {reps} x {count} messages flat out, {latency_count} at {latency_rate:g}/s, "
        "agent socketpair to gRPC subscriber vs bare grpc.aio"
    )
    log_file = open(work / "events-server.log", "ab")  # noqa: SIM115, ASYNC230
    managed, bare = EventServer("managed", env, log_file), EventServer("bare", env, log_file)
    await asyncio.gather(managed.start(), bare.start())
    rates: dict[str, list[float]] = {"managed": [], "bare": []}
    p99s: dict[str, list[float]] = {"managed": [], "bare": []}
    p50s: dict[str, list[float]] = {"managed": [], "bare": []}
    lost: list[dict[str, int]] = []
    try:
        for server in (managed, bare):  # warm-up
            await server.measure("throughput", min(count, 500), 0)
        for rep in range(reps):
            order = [("managed", managed), ("bare", bare)]
            if rep % 2:
                order.reverse()
            for name, server in order:
                run = await server.measure("throughput", count, 0)
                rates[name].append(run.rate)
                if name == "managed":
                    lost.append(
                        {"sent": run.sent, "received": run.received, "dropped": run.dropped}
                    )
                lat = await server.measure("latency", latency_count, latency_rate)
                p99s[name].append(lat.p99_ms)
                p50s[name].append(lat.p50_ms)
    finally:
        await asyncio.gather(managed.close(), bare.close())
        log_file.close()
    figures.append(
        Figure(
            key="events.throughput",
            label="agent messages/s, agent socket to gRPC subscriber",
            unit="msg/s",
            values=rates["managed"],
            baseline=rates["bare"],
            baseline_label="bare grpc.aio server-stream of the same messages",
            target=("ratio", ">=", 0.9),
            note="framed agent protocol over a socketpair into AgentEventListener.serve of a "
            "ManagerService (tracing interceptor on), to an Events subscriber in another process",
            extra={"messages": count, "delivery": lost},
        )
    )
    figures.append(
        Figure(
            key="events.p99_latency",
            label=f"agent message p99 latency at {latency_rate:g} msg/s",
            unit="ms",
            values=p99s["managed"],
            baseline=p99s["bare"],
            baseline_label="bare grpc.aio server-stream",
            target=("ratio", "<=", 1.2),
            note="the agent is a process of its own, so each message also waits for two "
            "processes to be scheduled, which the bare server (making its messages itself) "
            "does not",
            extra={
                "messages": latency_count,
                "p50_ms": summary(p50s["managed"]),
                "baseline_p50_ms": summary(p50s["bare"]),
            },
        )
    )
