"""How long a 60,000-dataset Run's checking and manifest building delays a concurrent health
check: on the event loop (validate_run_request + manifest_json, as called before) and through
manifest.validated_manifest (a worker thread for big requests).

A grpc.aio server with the health service runs on the loop; a client thread (its own
channel) sends a Check every 5 ms and records each answer's latency while the loop does the
work. Prints one line per variant: the work's duration and the health checks' worst latency.

    PYTHONPATH=src .venv/bin/python scripts/manifest_loop_lag.py [--datasets 60000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import threading
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cocos_manager.agent.manifest import manifest_json, validate_run_request, validated_manifest
from cocos_manager.proto import manager_pb2 as pb


def big_request(datasets: int) -> pb.ComputationRunReq:
    digest = hashlib.sha3_256(b"x").digest()
    return pb.ComputationRunReq(
        id="big",
        datasets=[
            pb.Dataset(provider="p", id=f"dataset-{i}", hash=digest) for i in range(datasets)
        ],
        algorithm=pb.Algorithm(provider="p", id="a", hash=digest),
        agent_config=pb.AgentConfig(port="7002"),
    )


class Prober(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                started = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.005)


async def measure(name: str, port: int, work: Callable[[], Awaitable[object]]) -> None:
    prober = Prober(port)
    prober.start()
    await asyncio.sleep(0.3)  # the prober is warm and answered
    before = len(prober.latencies)
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    await asyncio.sleep(0.2)
    prober.stop.set()
    await asyncio.to_thread(prober.join)
    during = prober.latencies[before:]
    print(
        f"{name:<34} work {took * 1000:7.1f} ms | health checks during it: {len(during):4d}, "
        f"worst {max(during) * 1000:7.1f} ms, median {statistics.median(during) * 1000:5.1f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", type=int, default=60_000)
    options = parser.parse_args()
    request = big_request(options.datasets)
    print(f"request: {options.datasets} datasets, {request.ByteSize() / 2**20:.1f} MiB")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def idle() -> None:
        await asyncio.sleep(0.5)

    async def on_loop() -> None:
        validate_run_request(request)
        manifest_json(request)

    async def off_loop() -> None:
        await validated_manifest(request)

    try:
        await measure("idle (baseline)", port, idle)
        await measure("on the loop (before)", port, on_loop)
        await measure("validated_manifest (after)", port, off_loop)
    finally:
        await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
