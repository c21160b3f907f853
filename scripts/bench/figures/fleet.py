"""Figure 7: what a daemon supervising many VMs costs, side by side with one supervising a single
VM (the figure a host with many small confidential VMs cares about). Two daemons with the
stand-in QEMU (tests/support/fake_qemu.py: 200 TCG guests do not fit 2 cores), both idle and
measured in turns: RSS, CPU while idle, List latency, a Run's latency among the others, and
the Run's `vm-provision complete` event reaching every one of several Events subscribers."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import psutil

from cocos_manager.proto import manager_pb2 as pb
from scripts.bench.common import MiB, log
from scripts.bench.daemon import BenchDaemon, DaemonConfig, Events
from scripts.bench.report import Figure, summary

SUBSCRIBERS = 16
LISTS = 20
RUNS = 5
IDLE_SECONDS = 2.0
WALL_OFFSET = time.time() - time.perf_counter()  # arrivals are perf_counter times


class Side:
    """One of the two daemons, its Events subscribers and what was measured of it."""

    def __init__(self, daemon: BenchDaemon) -> None:
        self.daemon = daemon
        self.subscribers: list[Events] = []
        self.rss: list[float] = []
        self.cpu: list[float] = []
        self.lists: list[float] = []
        self.runs: list[float] = []
        self.fanouts: list[float] = []

    async def start(self, vms: int) -> None:
        await self.daemon.start_serving(subscribe=True)
        await self.daemon.warm_up()
        assert self.daemon.channel is not None
        for _ in range(SUBSCRIBERS - 1):  # the daemon's own subscription is the first
            events = Events(self.daemon.channel)
            await events.start()
            self.subscribers.append(events)
        assert self.daemon.events is not None
        self.subscribers.append(self.daemon.events)
        ids = [f"fleet-{i}" for i in range(vms)]
        for chunk in range(0, vms, 50):  # in chunks: 200 stand-ins at once swamp 2 cores
            results = await asyncio.gather(
                *(self.daemon.run(i) for i in ids[chunk : chunk + 50]), return_exceptions=True
            )
            bad = [r for r in results if isinstance(r, BaseException)]
            if bad:
                raise RuntimeError(f"{len(bad)} stand-in Runs failed: {bad[0]!r}")
        # Every subscription must be live before anything is timed through it.
        probe = [e.expect("fleet-probe", "vm-provision", "complete") for e in self.subscribers]
        await self.daemon.run("fleet-probe")
        await asyncio.wait_for(asyncio.gather(*probe), 30)
        await self.daemon.stop_vm("fleet-probe")

    async def measure_requests(self, rep: int) -> None:
        stub = self.daemon.stub
        times = []
        for _ in range(LISTS):
            started = time.perf_counter()
            await stub.List(pb.ListRequest(), timeout=30)
            times.append((time.perf_counter() - started) * 1000)
        self.lists.append(statistics.median(times))
        runs, fanouts = [], []
        for i in range(RUNS):
            cid = f"fleet-run-{rep}-{i}"
            arrivals = [e.expect(cid, "vm-provision", "complete") for e in self.subscribers]
            started = time.perf_counter()
            await self.daemon.run(cid)
            runs.append((time.perf_counter() - started) * 1000)
            arrived = await asyncio.wait_for(asyncio.gather(*arrivals), 30)
            # The event's timestamp is taken when the daemon publishes it (same host, same
            # clock): from there to the last subscriber that got it.
            published_ns = arrived[0][1].agent_event.timestamp.ToNanoseconds()
            last = max(t for t, _ in arrived) + WALL_OFFSET
            fanouts.append(last * 1000 - published_ns / 1e6)
            await self.daemon.stop_vm(cid)
        self.runs.append(statistics.median(runs))
        self.fanouts.append(statistics.median(fanouts))

    async def close(self) -> None:
        for events in self.subscribers:
            if events is not self.daemon.events:
                await events.close()
        await self.daemon.close()


async def idle_sample(sides: list[Side]) -> None:
    """RSS, and CPU over the same IDLE_SECONDS, of both daemons at once."""
    processes = [psutil.Process(s.daemon.pid) for s in sides]
    before = [p.cpu_times() for p in processes]
    await asyncio.sleep(IDLE_SECONDS)
    for side, process, was in zip(sides, processes, before, strict=True):
        now = process.cpu_times()
        used = now.user + now.system - was.user - was.system
        side.cpu.append(max(0.0, used / IDLE_SECONDS * 100))
        side.rss.append(side.daemon.rss() / MiB)


async def fig_fleet(
    work: Path, jaeger_port: int, fake: DaemonConfig, reps: int, vms: int, figures: list[Figure]
) -> None:
    log(f"fleet: a daemon with {vms} stand-in VMs beside one with 1, {reps} repetitions")
    many_cfg = fake.renamed("fleet-many")
    many_cfg.vnc_span = vms + 40
    many = Side(BenchDaemon(many_cfg, work, jaeger_port))
    one = Side(BenchDaemon(fake.renamed("fleet-one"), work, jaeger_port))
    try:
        await one.start(1)
        await many.start(vms)
        await asyncio.sleep(1.0)
        for rep in range(reps):
            await idle_sample([many, one])
            order = [many, one] if rep % 2 == 0 else [one, many]
            for side in order:
                await side.measure_requests(rep)
    finally:
        await asyncio.gather(many.close(), one.close(), return_exceptions=True)
    base = "the same with 1 VM (a second daemon, measured in turns)"
    rows = (
        ("rss", f"daemon RSS, {vms} idle VMs", "MiB", many.rss, one.rss, ""),
        ("list", f"List latency, {vms} VMs", "ms", many.lists, one.lists, f"median of {LISTS}"),
        (
            "run",
            f"Run latency among {vms} VMs (stand-in QEMU)",
            "ms",
            many.runs,
            one.runs,
            f"median of {RUNS} Runs, each stopped before the next",
        ),
        (
            "events_fanout",
            f"Events fan-out to {SUBSCRIBERS} subscribers, {vms} VMs",
            "ms",
            many.fanouts,
            one.fanouts,
            f"a Run's vm-provision complete event, from its publication (the event's "
            f"timestamp) to the last of {SUBSCRIBERS} Events subscribers (all computations) "
            "that got it",
        ),
    )
    figures.append(
        Figure(
            key="fleet.cpu_idle",
            label=f"daemon CPU, {vms} idle VMs",
            unit="%",
            values=many.cpu,
            note=f"over {IDLE_SECONDS:g} s with no requests (psutil, 10 ms ticks); the daemon "
            "with 1 VM is in `one_vm` (no ratio: it is often 0)",
            extra={"vms": vms, "one_vm": summary(one.cpu)},
        )
    )
    for key, label, unit, values, baseline, note in rows:
        figures.append(
            Figure(
                key=f"fleet.{key}",
                label=label,
                unit=unit,
                values=values,
                baseline=baseline,
                baseline_label=base,
                note=("stand-in QEMU; informational, no target. " + note).strip(),
                extra={"vms": vms, "subscribers": SUBSCRIBERS},
            )
        )
