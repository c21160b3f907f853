"""Per-VM CPU and memory series, read from /proc of real processes and scraped over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cocos_manager.telemetry.metrics import Metrics, MetricsServer, start_metrics_server
from cocos_manager.telemetry.vm_metrics import (
    process_usage,
    register_vm_metrics,
    unregister_vm_metrics,
)

# Burns about 0.4 s of CPU and holds 64 MiB resident, then says so and waits to be killed.
BUSY = (
    "import sys, time\n"
    "block = bytearray(64 << 20)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "end = time.process_time() + 0.4\n"
    "while time.process_time() < end: pass\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def busy_process() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", BUSY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    yield process
    process.kill()
    process.wait()


def test_process_usage_matches_what_the_kernel_reports(
    busy_process: subprocess.Popen[str],
) -> None:
    usage = process_usage(busy_process.pid)
    assert usage is not None
    times = psutil.Process(busy_process.pid).cpu_times()
    assert usage.cpu_seconds >= 0.4
    assert abs(usage.cpu_seconds - (times.user + times.system)) < 0.05
    assert usage.resident_bytes >= 64 << 20
    rss = psutil.Process(busy_process.pid).memory_info().rss
    assert abs(usage.resident_bytes - rss) < 4 << 20


def test_a_gone_or_reaped_process_has_no_usage(busy_process: subprocess.Popen[str]) -> None:
    pid = busy_process.pid
    busy_process.kill()
    busy_process.wait()
    assert process_usage(pid) is None


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics()
    server = await start_metrics_server(0, "127.0.0.1", metrics)
    assert server is not None
    yield metrics, server
    await server.close()


async def scrape(server: MetricsServer) -> dict[tuple[str, str], float]:
    def get() -> str:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, sample.labels["computation_id"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name.startswith("manager_vm_")
    }


async def test_series_per_vm_appear_and_go_with_the_vm(
    served: tuple[Metrics, MetricsServer], busy_process: subprocess.Popen[str]
) -> None:
    metrics, server = served
    vms: dict[str, int] = {"busy": busy_process.pid, "not-spawned-yet": 0}
    collector = register_vm_metrics(lambda: tuple(vms.items()), metrics.registry)

    samples = await scrape(server)
    assert set(samples) == {
        ("manager_vm_cpu_seconds_total", "busy"),
        ("manager_vm_resident_memory_bytes", "busy"),
    }
    assert samples[("manager_vm_cpu_seconds_total", "busy")] >= 0.4
    assert samples[("manager_vm_resident_memory_bytes", "busy")] >= 64 << 20

    # A VM still listed whose process died is not reported; one no longer listed neither.
    busy_process.kill()
    busy_process.wait()
    assert await scrape(server) == {}
    vms.clear()
    assert await scrape(server) == {}

    unregister_vm_metrics(collector, metrics.registry)
    vms["busy"] = 1  # PID 1 exists: after unregistering, nothing is read any more
    assert await scrape(server) == {}


async def test_registering_reads_no_vm_yet(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, _ = served

    def not_ready() -> tuple[tuple[str, int], ...]:
        raise AssertionError("read at registration")

    unregister_vm_metrics(register_vm_metrics(not_ready, metrics.registry), metrics.registry)
